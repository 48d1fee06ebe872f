//! The commerce-API simulator (`holdclear sim`).

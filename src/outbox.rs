//! The outbox relay: committed events to `holdclear.events`, with confirms.

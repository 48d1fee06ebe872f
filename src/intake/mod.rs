//! Intake: a delivery becomes a validated event and a case, or a dead letter.

//! The case engine: the state machine and the scheduler that steps due cases.

//! The domain: validated values that every other module shares. No I/O here.
//!
//! An incoming payload becomes these types once, at the boundary
//! ([`HeldOrderEvent::decode`]); nothing deeper re-checks strings.

mod account;
mod case;
pub mod dead_letter;
mod event;
mod values;

pub use account::{AccountSelector, AccountType, Target, VirtualAccountChoice};
pub use case::{CaseState, EscalationLevel, EscalationReason};
pub use dead_letter::{DeadLetterMessage, OrderIds};
pub use event::{
    DeadLetterCode, DecodeError, EndCustomer, HELD_EVENT_TYPE, HeldOrder, HeldOrderEvent,
    HoldReason, Line, Partner, PendingSmartAccount,
};
pub use values::{
    CountryCode, Domain, Email, EventId, OrderId, OrderType, SalesOrderNumber, ValueError,
    WebOrderId,
};

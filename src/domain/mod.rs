//! The domain: validated values that every other module shares. No I/O here.
//!
//! An incoming payload becomes these types once, at the boundary
//! ([`HeldOrderEvent::decode`]); nothing deeper re-checks strings.

mod account;
mod case;
mod event;
mod values;

pub use account::{AccountSelector, AccountType, Target, VirtualAccountChoice};
pub use case::{CaseState, EscalationLevel, EscalationReason};
pub use event::{
    DecodeError, DeadLetterCode, EndCustomer, HeldOrder, HeldOrderEvent, HoldReason, Line, Partner,
    PendingSmartAccount, HELD_EVENT_TYPE,
};
pub use values::{CountryCode, Domain, Email, EventId, OrderId, OrderType, SalesOrderNumber, ValueError, WebOrderId};

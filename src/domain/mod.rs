//! The domain: the model every other module shares. No I/O here, and no
//! import of any other module of the crate.
//!
//! - validated values and the held-order event ([`HeldOrderEvent::decode`]);
//! - what to assign ([`Target`], [`Decision`], [`Assignment`], [`ResolvedTarget`]);
//! - the case ([`Case`], [`CaseState`]), its [`HistoryEntry`] lines and why it
//!   escalates;
//! - the events it emits ([`OutboundEvent`]) and their [`Envelope`].
//!
//! An incoming payload becomes these types once, at the boundary
//! ([`HeldOrderEvent::decode`]); nothing deeper re-checks strings.

mod account;
mod case;
pub mod dead_letter;
mod event;
mod outbound;
mod values;

pub use account::{AccountSelector, AccountType, Assignment, Target, VirtualAccountChoice};
pub use case::{
    Accepted, Case, CaseState, Decision, EscalationLevel, EscalationReason, HistoryEntry, Progress,
    ResolvedTarget, Stage,
};
pub use dead_letter::{DeadLetterMessage, OrderIds};
pub use event::{
    DeadLetterCode, DecodeError, EndCustomer, HELD_EVENT_TYPE, HeldOrder, HeldOrderEvent,
    HoldReason, Line, Partner, PendingSmartAccount,
};
pub use outbound::{CONTENT_TYPE, Envelope, OutboundEvent, SOURCE, envelope_id};
pub use values::{
    CountryCode, Domain, Email, EventId, OrderId, OrderType, SalesOrderNumber, ValueError,
    WebOrderId,
};

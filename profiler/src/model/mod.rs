//! The data that flows between the stages, apart from the stages that
//! make and use it (see ARCHITECTURE.md):
//!
//! capture ([`RawProfile`] of [`RawStack`]s, per-signal data) ->
//! normalize and symbolize ([`Frame`]s, each unknown one an [`Unknown`]
//! with its reason) -> [`SymbolizedStack`] -> fold ([`Folded`]) ->
//! render and export.
//!
//! Stages import this module, not each other's types.

mod frames;
mod raw;

pub use frames::{
    Folded, Frame, FrameKind, Side, SymbolizedStack, Unknown, UnknownReason, sanitize,
};
pub use raw::{
    CountedEvents, Counters, Cut, LoopThreadRaw, MAX_OFFCPU_SPANS, MAX_SOCKET_OWNERS, OffCpuStack,
    OomKill, OwnerInfo, RawProfile, RawStack, RawStackPart, Second, TimedRequest, TimedSample,
    TurnBlock, Unavailable, UnwindStats,
};

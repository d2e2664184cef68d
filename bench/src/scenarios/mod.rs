//! The scenarios measured on Gantry itself, one file each.

mod api;
mod dispatch;
mod idle_agent;
mod lines;
mod queued_rss;
mod sequential;
mod throughput;

pub(crate) use api::api;
pub(crate) use dispatch::dispatch;
pub(crate) use idle_agent::idle_agent;
pub(crate) use lines::lines;
pub(crate) use queued_rss::queued_rss;
pub(crate) use sequential::sequential;
pub(crate) use throughput::throughput;

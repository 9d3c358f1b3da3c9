//! pubgate-loadtest: drives real WebSocket subscribers and HTTP (or raw Redis) publishers against pubgate nodes
//! on this machine (loopback only) and reports throughput, latency, loss and cost per connection.
//!
//! Scenarios: `connect` (idle connections and their memory), `fanout` (subscribers × publishers),
//! `step` (raise the rate until it breaks), `churn` (connections coming and going under fan-out),
//! `ticker` (a price ticker whose slow dashboards are conflated) and `chart` (SVG charts from the JSON results).

pub mod chart;
pub mod churn;
pub mod cli;
pub mod connect;
pub mod deflate;
pub mod fanout;
pub mod handshake;
pub mod procfs;
pub mod publish;
pub mod ramp;
pub mod redis_pub;
pub mod report;
pub mod scan;
pub mod shards;
pub mod stats;
pub mod step;
pub mod ticker;
pub mod tls;
pub mod track;
pub mod ws;

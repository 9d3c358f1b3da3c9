//! `chart`: SVG charts from result files — memory per connection against connections (from
//! `connect` results: one node over ws:// and wss://, and runs across several nodes) and end-to-end
//! latency against delivery rate (from `step` and `fanout`).

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::report::Report;

/// A named, coloured line of points.
type Series = (String, RGBColor, Vec<(f64, f64)>);

/// Flags of `chart`.
#[derive(Args, Debug, Clone, Serialize, Deserialize)]
pub struct ChartArgs {
    /// Result files (JSON written with --json); their scenario decides which chart they feed.
    #[arg(long = "input", required = true, value_name = "FILE")]
    pub inputs: Vec<PathBuf>,
    /// Where to write memory-per-connection.svg and latency-vs-rate.svg.
    #[arg(long, default_value = "docs", value_name = "DIR")]
    pub out_dir: PathBuf,
}

/// Which curve of the memory chart a `connect` result belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum MemSeries {
    /// One node, plain WebSocket.
    Ws,
    /// One node, WebSocket over TLS.
    Wss,
    /// Several nodes (this many), connections counted across all of them.
    Nodes(usize),
}

impl MemSeries {
    fn of(r: &Report) -> MemSeries {
        let servers = r.result["servers"].as_array().map_or(0, Vec::len);
        let urls: Vec<&str> = r.params["urls"]
            .as_array()
            .map(|a| a.iter().filter_map(|u| u.as_str()).collect())
            .unwrap_or_default();
        let nodes = servers.max(urls.len());
        let tls = r.params["tls"].as_bool() == Some(true)
            || urls
                .iter()
                .any(|u| u.starts_with("wss://") || u.starts_with("https://"));
        if nodes > 1 {
            MemSeries::Nodes(nodes)
        } else if tls {
            MemSeries::Wss
        } else {
            MemSeries::Ws
        }
    }

    fn name(self) -> String {
        match self {
            MemSeries::Ws => "one node, ws://".into(),
            MemSeries::Wss => "one node, wss://".into(),
            MemSeries::Nodes(n) => format!("{n} nodes on Redis, ws://"),
        }
    }

    /// Colours of the RSS and the total curve.
    fn colors(self) -> (RGBColor, RGBColor) {
        match self {
            MemSeries::Ws => (BLUE, RED),
            MemSeries::Wss => (RGBColor(0, 140, 140), RGBColor(230, 120, 0)),
            MemSeries::Nodes(_) => (RGBColor(100, 0, 170), RGBColor(150, 90, 0)),
        }
    }
}

/// One point of the memory chart.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemPoint {
    /// The curve it belongs to.
    pub series: MemSeries,
    /// Established connections (across all nodes for [`MemSeries::Nodes`]).
    pub connections: f64,
    /// Server RSS growth per connection, KiB.
    pub rss_kib: f64,
    /// RSS plus the server's share of kernel socket memory, KiB.
    pub total_kib: f64,
}

/// One point of the latency chart.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatPoint {
    /// Offered deliveries per second (publish rate × subscribers per topic).
    pub rate: f64,
    /// p50, ms.
    pub p50: f64,
    /// p99, ms.
    pub p99: f64,
    /// p99.9, ms.
    pub p999: f64,
}

/// Extracts chart points from reports.
pub fn points(reports: &[Report]) -> (Vec<MemPoint>, Vec<LatPoint>) {
    let mut mem = Vec::new();
    let mut lat = Vec::new();
    let lat_of = |phase: &serde_json::Value| -> Option<LatPoint> {
        let l = &phase["latency"];
        Some(LatPoint {
            rate: phase["offered_delivery_rate"]
                .as_f64()
                .or_else(|| phase["deliveries_per_s"].as_f64())?,
            p50: l["p50_us"].as_f64()? / 1000.0,
            p99: l["p99_us"].as_f64()? / 1000.0,
            p999: l["p999_us"].as_f64()? / 1000.0,
        })
    };
    for r in reports {
        match r.scenario.as_str() {
            "connect" => {
                let res = &r.result;
                if let (Some(c), Some(rss)) = (
                    res["established"].as_f64(),
                    res["server_rss_per_conn_bytes"].as_f64(),
                ) {
                    let total = res["server_total_per_conn_bytes"].as_f64().unwrap_or(rss);
                    mem.push(MemPoint {
                        series: MemSeries::of(r),
                        connections: c,
                        rss_kib: rss / 1024.0,
                        total_kib: total / 1024.0,
                    });
                }
            }
            "step" => {
                if let Some(steps) = r.result["steps"].as_array() {
                    lat.extend(steps.iter().filter_map(|s| lat_of(&s["phase"])));
                }
            }
            "fanout" => lat.extend(lat_of(&r.result["phase"])),
            _ => {}
        }
    }
    mem.sort_by(|a, b| {
        (a.series, a.connections)
            .partial_cmp(&(b.series, b.connections))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    lat.sort_by(|a, b| a.rate.total_cmp(&b.rate));
    (mem, lat)
}

fn draw_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing: {e:?}")
}

/// A labelled curve through `pts`.
fn draw_line<DB, CT>(
    chart: &mut ChartContext<'_, DB, CT>,
    name: String,
    color: RGBColor,
    pts: &[(f64, f64)],
) -> anyhow::Result<()>
where
    DB: DrawingBackend,
    CT: CoordTranslate<From = (f64, f64)>,
{
    chart
        .draw_series(LineSeries::new(pts.to_vec(), color.stroke_width(2)))
        .map_err(draw_err)?
        .label(name)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    Ok(())
}

/// A dot on each of `pts`.
fn draw_dots<DB, CT>(
    chart: &mut ChartContext<'_, DB, CT>,
    color: RGBColor,
    pts: &[(f64, f64)],
) -> anyhow::Result<()>
where
    DB: DrawingBackend,
    CT: CoordTranslate<From = (f64, f64)>,
{
    chart
        .draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))
        .map_err(draw_err)?;
    Ok(())
}

/// Memory per connection against connections (log scale, so 1k per node and 100k across nodes fit
/// on one chart): RSS and RSS plus the kernel's share, one pair of curves per [`MemSeries`].
pub fn memory_chart(path: &Path, mem: &[MemPoint]) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_err)?;
    let xmin = mem.iter().map(|p| p.connections).fold(1000.0, f64::min) * 0.7;
    let xmax = mem.iter().map(|p| p.connections).fold(1000.0, f64::max) * 1.4;
    let ymax = mem
        .iter()
        .map(|p| p.total_kib.max(p.rss_kib))
        .fold(11.0, f64::max)
        * 1.7; // headroom so the legend sits above the data
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "pubgate: memory per idle subscribed connection",
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d((xmin..xmax).log_scale(), 0f64..ymax)
        .map_err(draw_err)?;
    chart
        .configure_mesh()
        .x_desc("idle subscribed connections (log scale; across all nodes for several nodes)")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc("KiB per connection")
        .draw()
        .map_err(draw_err)?;
    let mut groups: Vec<MemSeries> = mem.iter().map(|p| p.series).collect();
    groups.dedup();
    for g in groups {
        let pts: Vec<&MemPoint> = mem.iter().filter(|p| p.series == g).collect();
        let (rss_color, total_color) = g.colors();
        let series: [Series; 2] = [
            (
                format!("{}: server RSS", g.name()),
                rss_color,
                pts.iter().map(|p| (p.connections, p.rss_kib)).collect(),
            ),
            (
                format!("{}: RSS + kernel socket share", g.name()),
                total_color,
                pts.iter().map(|p| (p.connections, p.total_kib)).collect(),
            ),
        ];
        for (name, color, pts) in series {
            draw_line(&mut chart, name, color, &pts)?;
            if let MemSeries::Nodes(_) = g {
                chart
                    .draw_series(
                        pts.iter()
                            .map(|&p| TriangleMarker::new(p, 7, color.filled())),
                    )
                    .map_err(draw_err)?;
            } else {
                draw_dots(&mut chart, color, &pts)?;
            }
        }
    }
    let refs: [(&str, f64, RGBColor); 3] = [
        ("target 4 KiB", 4.0, GREEN),
        (
            "fastwebsockets broadcaster 7.3 KB",
            7.3 * 1000.0 / 1024.0,
            MAGENTA,
        ),
        ("nginx+nchan 10.5 KB", 10.5 * 1000.0 / 1024.0, BLACK),
    ];
    for (name, y, color) in refs {
        chart
            .draw_series(LineSeries::new(vec![(xmin, y), (xmax, y)], color.mix(0.6)))
            .map_err(draw_err)?
            .label(name)
            .legend(move |(x, yy)| PathElement::new(vec![(x, yy), (x + 20, yy)], color));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(draw_err)?;
    root.present().map_err(draw_err)?;
    Ok(())
}

/// End-to-end latency against delivered rate.
pub fn latency_chart(path: &Path, lat: &[LatPoint]) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_err)?;
    let xmax = lat.iter().map(|p| p.rate).fold(1000.0, f64::max) * 1.05;
    let ymax = lat.iter().map(|p| p.p999).fold(2.5, f64::max) * 6.0; // legend headroom (log)
    let ymin = lat.iter().map(|p| p.p50).fold(1.0, f64::min).max(0.01) * 0.7;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "pubgate: end-to-end latency vs offered rate (one node)",
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..xmax, (ymin..ymax).log_scale())
        .map_err(draw_err)?;
    chart
        .configure_mesh()
        .x_desc("offered deliveries per second (publish rate x subscribers per topic)")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc("latency, ms (log)")
        .draw()
        .map_err(draw_err)?;
    let series: [Series; 3] = [
        (
            "p50".into(),
            BLUE,
            lat.iter().map(|p| (p.rate, p.p50)).collect(),
        ),
        (
            "p99".into(),
            RED,
            lat.iter().map(|p| (p.rate, p.p99)).collect(),
        ),
        (
            "p99.9".into(),
            MAGENTA,
            lat.iter().map(|p| (p.rate, p.p999)).collect(),
        ),
    ];
    for (name, color, pts) in series {
        draw_line(&mut chart, name, color, &pts)?;
        draw_dots(&mut chart, color, &pts)?;
    }
    chart
        .draw_series(LineSeries::new(
            vec![(0.0, 2.0), (xmax, 2.0)],
            GREEN.mix(0.7),
        ))
        .map_err(draw_err)?
        .label("target: p99 < 2 ms at 20k/s")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], GREEN));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(draw_err)?;
    root.present().map_err(draw_err)?;
    Ok(())
}

/// Runs `chart`.
pub fn run(args: &ChartArgs) -> anyhow::Result<Vec<PathBuf>> {
    let mut reports = Vec::new();
    for p in &args.inputs {
        let text =
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        let r: Report =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))?;
        reports.push(r);
    }
    let (mem, lat) = points(&reports);
    std::fs::create_dir_all(&args.out_dir)?;
    let mut written = Vec::new();
    if !mem.is_empty() {
        let p = args.out_dir.join("memory-per-connection.svg");
        memory_chart(&p, &mem)?;
        written.push(p);
    }
    if !lat.is_empty() {
        let p = args.out_dir.join("latency-vs-rate.svg");
        latency_chart(&p, &lat)?;
        written.push(p);
    }
    anyhow::ensure!(
        !written.is_empty(),
        "no connect, step or fanout results among the inputs"
    );
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(scenario: &str, result: serde_json::Value) -> Report {
        Report {
            scenario: scenario.into(),
            tool_version: "0".into(),
            command: String::new(),
            started_unix: 0,
            machine: Default::default(),
            params: serde_json::Value::Null,
            result,
            failures: Vec::new(),
        }
    }

    #[test]
    fn extracts_points_and_draws() {
        let phase = |rate: f64| serde_json::json!({"deliveries_per_s": rate, "latency": {"p50_us": 300.0, "p99_us": 900.0, "p999_us": 1500.0}});
        let reports = vec![
            report(
                "connect",
                serde_json::json!({"established": 5000, "server_rss_per_conn_bytes": 6144.0, "server_total_per_conn_bytes": 8192.0}),
            ),
            report(
                "connect",
                serde_json::json!({"established": 1000, "server_rss_per_conn_bytes": 7168.0}),
            ),
            Report {
                params: serde_json::json!({"urls": ["wss://127.0.0.1:1/ws"], "tls": true}),
                ..report(
                    "connect",
                    serde_json::json!({"established": 2000, "server_rss_per_conn_bytes": 9216.0, "servers": [{"pid": 1}]}),
                )
            },
            Report {
                params: serde_json::json!({"urls": ["ws://127.0.0.1:1/ws", "ws://127.0.0.1:2/ws", "ws://127.0.0.1:3/ws"]}),
                ..report(
                    "connect",
                    serde_json::json!({"established": 100000, "server_rss_per_conn_bytes": 3072.0, "server_total_per_conn_bytes": 7168.0, "servers": [{"pid": 1}, {"pid": 2}, {"pid": 3}]}),
                )
            },
            report(
                "step",
                serde_json::json!({"steps": [{"phase": phase(20000.0)}, {"phase": phase(40000.0)}]}),
            ),
            report("fanout", serde_json::json!({"phase": phase(10000.0)})),
        ];
        let (mem, lat) = points(&reports);
        assert_eq!(mem.len(), 4);
        assert_eq!(mem[0].series, MemSeries::Ws);
        assert_eq!(mem[0].connections, 1000.0);
        assert_eq!(mem[0].total_kib, 7.0);
        assert_eq!(mem[1].total_kib, 8.0);
        assert_eq!((mem[2].series, mem[2].rss_kib), (MemSeries::Wss, 9.0));
        assert_eq!(
            (mem[3].series, mem[3].connections, mem[3].rss_kib),
            (MemSeries::Nodes(3), 100000.0, 3.0)
        );
        assert_eq!(lat.len(), 3);
        assert_eq!(lat[0].rate, 10000.0);
        assert!((lat[0].p99 - 0.9).abs() < 1e-9);
        let dir = std::env::temp_dir().join(format!("loadtest-chart-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        memory_chart(&dir.join("m.svg"), &mem).unwrap();
        latency_chart(&dir.join("l.svg"), &lat).unwrap();
        let svg = std::fs::read_to_string(dir.join("m.svg")).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("KiB per connection"));
        assert!(
            svg.contains("one node, wss://: server RSS"),
            "WSS curve missing"
        );
        assert!(
            svg.contains("3 nodes on Redis, ws://: server RSS"),
            "multi-node point missing"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

//! The load publisher's report: throughput, latency percentiles per command
//! type, lost commands, and a page with the latency over time.

use std::{collections::BTreeMap, path::Path, time::Duration};

use anyhow::Context;
use hdrhistogram::Histogram;
use serde::Serialize;

use super::{LoadOptions, Stats};

#[derive(Debug, Clone, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Percentiles {
    fn of(histogram: &Histogram<u64>) -> Self {
        let ms = |micros: u64| micros as f64 / 1000.0;
        Percentiles {
            count: histogram.len(),
            p50_ms: ms(histogram.value_at_quantile(0.50)),
            p95_ms: ms(histogram.value_at_quantile(0.95)),
            p99_ms: ms(histogram.value_at_quantile(0.99)),
            max_ms: ms(histogram.max()),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct SecondSample {
    pub second: usize,
    pub outcomes: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    pub scenario: String,
    pub target_flow_rate: f64,
    pub flows_started: usize,
    pub flows_completed: u64,
    pub publishing_secs: f64,
    pub elapsed_secs: f64,
    pub flows_per_sec: f64,
    pub commands_sent: u64,
    pub commands_per_sec: f64,
    pub duplicates_sent: u64,
    pub duplicate_outcomes: u64,
    pub all_commands: Percentiles,
    pub per_command: BTreeMap<String, Percentiles>,
    pub outcomes: BTreeMap<String, u64>,
    /// (contacts reached, contacts invited) per the stand-in gateway.
    pub sms_delivered: Option<(usize, usize)>,
    /// Commands that got no outcome: (type, message id).
    pub lost: Vec<(String, String)>,
    /// Commands the broker did not take: (type, message id). Never seen by
    /// the service, so not among the lost.
    pub not_published: Vec<(String, String)>,
    /// The event listener lost the broker during the run: from then on a
    /// missing outcome says nothing about the service.
    pub listener_lost: bool,
    pub timeline: Vec<SecondSample>,
}

impl LoadReport {
    pub(super) fn build(
        options: &LoadOptions,
        flows_started: usize,
        publishing: Duration,
        elapsed: Duration,
        stats: Stats,
        sms_delivered: Option<(usize, usize)>,
    ) -> Self {
        let mut all = super::histogram();
        for histogram in stats.latency.values() {
            let _ = all.add(histogram);
        }
        let per_command =
            stats.latency.iter().map(|(kind, h)| (kind.clone(), Percentiles::of(h))).collect();
        let timeline = stats
            .timeline
            .iter()
            .enumerate()
            .map(|(second, h)| SecondSample {
                second,
                outcomes: h.len(),
                p50_ms: h.value_at_quantile(0.5) as f64 / 1000.0,
                p99_ms: h.value_at_quantile(0.99) as f64 / 1000.0,
            })
            .collect();
        let secs = elapsed.as_secs_f64().max(0.001);
        LoadReport {
            scenario: format!("{:?}", options.scenario).to_lowercase(),
            target_flow_rate: options.rate,
            flows_started,
            flows_completed: stats.flows_completed,
            publishing_secs: publishing.as_secs_f64(),
            elapsed_secs: secs,
            flows_per_sec: stats.flows_completed as f64 / secs,
            commands_sent: stats.sent,
            commands_per_sec: stats.sent as f64 / secs,
            duplicates_sent: stats.duplicates_sent,
            duplicate_outcomes: stats.duplicate_outcomes,
            all_commands: Percentiles::of(&all),
            per_command,
            outcomes: stats.outcomes,
            sms_delivered,
            lost: stats.lost,
            not_published: stats.not_published,
            listener_lost: false,
            timeline,
        }
    }

    pub fn summary(&self) -> String {
        let mut out = format!(
            "{} flows started at {:.0}/s target; {} completed in {:.1} s ({:.1} flows/s); \
             {} commands ({:.1}/s), {} duplicates sent, {} second outcomes, {} lost\n",
            self.flows_started,
            self.target_flow_rate,
            self.flows_completed,
            self.elapsed_secs,
            self.flows_per_sec,
            self.commands_sent,
            self.commands_per_sec,
            self.duplicates_sent,
            self.duplicate_outcomes,
            self.lost.len(),
        );
        out.push_str(&format!(
            "{:<28} {:>7} {:>9} {:>9} {:>9} {:>9}\n",
            "command", "count", "p50 ms", "p95 ms", "p99 ms", "max ms"
        ));
        let all = "all".to_owned();
        let rows = self.per_command.iter().chain([(&all, &self.all_commands)]);
        for (kind, p) in rows {
            out.push_str(&format!(
                "{:<28} {:>7} {:>9.1} {:>9.1} {:>9.1} {:>9.1}\n",
                kind, p.count, p.p50_ms, p.p95_ms, p.p99_ms, p.max_ms
            ));
        }
        if let Some((reached, invited)) = self.sms_delivered {
            out.push_str(&format!("SMS: {reached} of {invited} invited contacts reached\n"));
        }
        if !self.not_published.is_empty() {
            let count = self.not_published.len();
            out.push_str(&format!(
                "{count} commands not published: the broker did not take them\n"
            ));
        }
        if self.listener_lost {
            out.push_str(
                "the event listener lost the broker: the lost count is not a measure of the \
                 service (the load publisher does not reconnect)\n",
            );
        }
        out
    }

    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        std::fs::write(dir.join("report.json"), serde_json::to_vec_pretty(self)?)?;
        std::fs::write(dir.join("report.html"), self.html())?;
        Ok(())
    }

    /// A self-contained page: the summary and an SVG chart of p50 and p99
    /// latency and outcomes per second.
    fn html(&self) -> String {
        let (width, height, pad) = (900.0, 320.0, 40.0);
        let seconds = self.timeline.len().max(2) as f64 - 1.0;
        let top_ms = self.timeline.iter().map(|s| s.p99_ms).fold(1.0_f64, f64::max) * 1.1;
        let top_rate = self.timeline.iter().map(|s| s.outcomes).max().unwrap_or(1).max(1) as f64;
        let x = |second: usize| pad + (width - 2.0 * pad) * second as f64 / seconds;
        let y = |value: f64, top: f64| height - pad - (height - 2.0 * pad) * value / top;
        let line = |pick: &dyn Fn(&SecondSample) -> f64, top: f64| {
            self.timeline
                .iter()
                .map(|s| format!("{:.1},{:.1}", x(s.second), y(pick(s), top)))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let p50 = line(&|s| s.p50_ms, top_ms);
        let p99 = line(&|s| s.p99_ms, top_ms);
        let rate = line(&|s| s.outcomes as f64, top_rate);
        let escape = |text: &str| text.replace('&', "&amp;").replace('<', "&lt;");
        format!(
            "<!doctype html><html><head><meta charset=\"utf-8\"><title>Trusted Contact load \
             report</title><style>body{{font-family:sans-serif;margin:2em}}pre{{background:#f4f4f4;\
             padding:1em}}</style></head><body><h1>Trusted Contact load report</h1>\
             <pre>{summary}</pre><h2>End-to-end latency over time</h2>\
             <svg width=\"{width}\" height=\"{height}\" style=\"border:1px solid #ccc\">\
             <polyline fill=\"none\" stroke=\"#bbb\" stroke-width=\"1\" points=\"{rate}\"/>\
             <polyline fill=\"none\" stroke=\"#2a7\" stroke-width=\"2\" points=\"{p50}\"/>\
             <polyline fill=\"none\" stroke=\"#c33\" stroke-width=\"2\" points=\"{p99}\"/>\
             <text x=\"{pad}\" y=\"20\">green p50, red p99 (0 to {top_ms:.0} ms); grey outcomes \
             per second (0 to {top_rate:.0}); x: seconds 0 to {seconds:.0}</text></svg>\
             </body></html>",
            summary = escape(&self.summary()),
        )
    }
}

//! Shader-level profiling of a compiled graph: per-kernel and per-layer tables from GPU
//! timestamps, and a Chrome/Perfetto trace with one event per dispatch. A dry run plans a graph
//! without a GPU and reports its memory and the cost model's work.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::Result;
use serde_json::json;

use crate::gpu::Context;
use crate::graph::{plan_memory, Graph, MemoryPlan, Plan, Timing};

#[derive(Debug, Clone)]
pub struct Row {
    pub name: String,
    pub calls: usize,
    pub total_ms: f64,
    pub flops: u64,
    pub bytes: u64,
}

impl Row {
    pub fn mean_us(&self) -> f64 {
        1e3 * self.total_ms / self.calls.max(1) as f64
    }
    pub fn gflops(&self) -> f64 {
        self.flops as f64 / (self.total_ms * 1e-3).max(1e-12) / 1e9
    }
    pub fn gbps(&self) -> f64 {
        self.bytes as f64 / (self.total_ms * 1e-3).max(1e-12) / 1e9
    }
}

#[derive(Debug, Clone)]
pub struct Profile {
    pub kernels: Vec<Row>,
    pub layers: Vec<Row>,
    pub iters: usize,
    pub batch: usize,
    pub timing: Timing,
    /// GPU time of one iteration (sum of its dispatches).
    pub ms_per_iter: f64,
    pub dispatches_per_iter: usize,
    pub submits_per_iter: usize,
    /// The buffer plan.
    pub memory: MemoryPlan,
    /// One Chrome trace event per dispatch of every profiled iteration.
    pub trace: serde_json::Value,
}

/// The model layer (official module name) a dispatch label belongs to: backward and
/// bookkeeping suffixes are dropped, block-internal ops are charged to their block, optimizer
/// work to `optimizer`.
pub fn layer_of(label: &str) -> String {
    if ["adam.", "grad_norm.", "ema."].iter().any(|p| label.starts_with(p)) {
        return "optimizer".into();
    }
    let mut l = label;
    loop {
        let before = l;
        for suffix in [
            ".grad_weight_reduce",
            ".grad_weight_parts",
            ".grad_weight",
            ".grad_input",
            ".grad_bias",
            ".grad_stats",
            ".grad_sum",
            ".grad_a",
            ".grad_b",
            ".backward",
            ".stats",
            ".spike_count",
        ] {
            l = l.strip_suffix(suffix).unwrap_or(l);
        }
        if l == before {
            break;
        }
    }
    for internal in [".temb_add", ".residual", ".concat", ".upsample"] {
        if let Some(block) = l.strip_suffix(internal) {
            return block.to_string();
        }
    }
    l.to_string()
}

/// Profile `iters` runs of `plan` (after one normal warm-up run); `batch` images per run.
pub fn profile(ctx: &Context, plan: &Plan, iters: usize, batch: usize) -> Result<Profile> {
    let stats = plan.run(ctx)?;
    ctx.wait()?;
    let nodes = plan.nodes();
    let mut kernels: BTreeMap<String, Row> = BTreeMap::new();
    let mut layers: BTreeMap<String, Row> = BTreeMap::new();
    let mut events = Vec::new();
    let mut timing = Timing::GpuTimestamps;
    let mut total_ms = 0.0;
    let mut offset_us = 0.0;
    for iter in 0..iters.max(1) {
        let t = plan.profile(ctx)?;
        timing = t.timing;
        for ((n, &ns), &start) in nodes.iter().zip(&t.ns).zip(&t.start_ns) {
            let ms = ns * 1e-6;
            total_ms += ms;
            for (map, key) in [(&mut kernels, n.kernel.clone()), (&mut layers, layer_of(&n.label))] {
                let row =
                    map.entry(key.clone()).or_insert(Row { name: key, calls: 0, total_ms: 0.0, flops: 0, bytes: 0 });
                row.calls += 1;
                row.total_ms += ms;
                row.flops += n.cost.flops;
                row.bytes += n.cost.bytes;
            }
            events.push(json!({
                "name": n.kernel, "cat": layer_of(&n.label), "ph": "X", "pid": 1, "tid": 1,
                "ts": offset_us + start * 1e-3, "dur": ns * 1e-3,
                "args": { "label": n.label, "layer": layer_of(&n.label), "iteration": iter,
                          "flops": n.cost.flops, "bytes": n.cost.bytes },
            }));
        }
        offset_us += t.start_ns.last().copied().unwrap_or(0.0) * 1e-3 + t.ns.last().copied().unwrap_or(0.0) * 1e-3;
    }
    let by_time = |m: BTreeMap<String, Row>| {
        let mut v: Vec<Row> = m.into_values().collect();
        v.sort_by(|a, b| b.total_ms.total_cmp(&a.total_ms));
        v
    };
    let iters = iters.max(1);
    Ok(Profile {
        kernels: by_time(kernels),
        layers: by_time(layers),
        iters,
        batch,
        timing,
        ms_per_iter: total_ms / iters as f64,
        dispatches_per_iter: stats.dispatches,
        submits_per_iter: stats.submits,
        memory: plan.memory().clone(),
        trace: json!({ "traceEvents": events, "displayTimeUnit": "ms" }),
    })
}

impl Profile {
    fn table(out: &mut String, title: &str, rows: &[Row], total: f64) {
        let _ = writeln!(
            out,
            "{title:<44} {:>6} {:>11} {:>10} {:>7} {:>9} {:>8}",
            "calls", "total ms", "mean us", "share%", "GFLOP/s", "GB/s"
        );
        for r in rows {
            let _ = writeln!(
                out,
                "{:<44} {:>6} {:>11.3} {:>10.1} {:>7.2} {:>9.2} {:>8.2}",
                r.name,
                r.calls,
                r.total_ms,
                r.mean_us(),
                100.0 * r.total_ms / total.max(1e-12),
                r.gflops(),
                r.gbps()
            );
        }
    }

    /// The two tables and the totals, as printed by `sddpm-gpu profile`.
    pub fn render(&self) -> String {
        let total: f64 = self.kernels.iter().map(|r| r.total_ms).sum();
        let mut out = String::new();
        Self::table(&mut out, "kernel", &self.kernels, total);
        out.push('\n');
        Self::table(&mut out, "layer", &self.layers, total);
        let _ = writeln!(
            out,
            "\ntotal: {:.3} ms per iteration ({} iterations, {}), {:.3} images/s at batch {}, {} dispatches and {} submits per iteration",
            self.ms_per_iter,
            self.iters,
            match self.timing {
                Timing::GpuTimestamps => "GPU timestamps",
                Timing::HostTimers => "host timers",
            },
            self.batch as f64 / (self.ms_per_iter * 1e-3).max(1e-12),
            self.batch,
            self.dispatches_per_iter,
            self.submits_per_iter
        );
        out.push_str(&memory_line(&self.memory));
        out.push('\n');
        out
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

/// MiB below 1 GiB, else GiB.
fn size(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.2} MiB", mib(bytes))
    }
}

/// The `memory:` line of `profile`, ending with the grand total the plan allocates on the GPU.
pub fn memory_line(m: &MemoryPlan) -> String {
    format!(
        "memory: intermediates {:.2} MiB planned by liveness (naive {:.2} MiB, {:.1}x), inputs + parameters + state {:.2} MiB, staging {:.2} MiB, node parameters {:.2} MiB, total {}",
        mib(m.planned_intermediate_bytes),
        mib(m.naive_intermediate_bytes),
        m.naive_intermediate_bytes as f64 / m.planned_intermediate_bytes.max(1) as f64,
        mib(m.fixed_bytes),
        mib(m.staging_bytes),
        mib(m.params_bytes),
        size(m.total_bytes())
    )
}

/// The plan of `g` without a GPU: per-kernel and per-layer work from the cost model, the largest
/// storage bindings (an adapter must allow them), and the memory line.
pub fn dry_run(g: &Graph) -> String {
    let m = plan_memory(g);
    let mut kernels: BTreeMap<String, Row> = BTreeMap::new();
    let mut layers: BTreeMap<String, Row> = BTreeMap::new();
    for n in &g.nodes {
        let kernel = format!("{}::{}", n.shader.name, n.entry);
        for (map, key) in [(&mut kernels, kernel), (&mut layers, layer_of(&n.label))] {
            let row = map.entry(key.clone()).or_insert(Row { name: key, calls: 0, total_ms: 0.0, flops: 0, bytes: 0 });
            row.calls += 1;
            row.flops += n.cost.flops;
            row.bytes += n.cost.bytes;
        }
    }
    let mut out = String::new();
    let (flops, bytes): (u64, u64) = g.nodes.iter().fold((0, 0), |(f, b), n| (f + n.cost.flops, b + n.cost.bytes));
    for (title, rows) in [("kernel", kernels), ("layer", layers)] {
        let mut rows: Vec<Row> = rows.into_values().collect();
        rows.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(b.flops.cmp(&a.flops)));
        let _ = writeln!(out, "{title:<44} {:>6} {:>12} {:>12} {:>8}", "calls", "MFLOP", "MB moved", "bytes%");
        for r in &rows {
            let _ = writeln!(
                out,
                "{:<44} {:>6} {:>12.2} {:>12.3} {:>8.2}",
                r.name,
                r.calls,
                r.flops as f64 * 1e-6,
                r.bytes as f64 * 1e-6,
                100.0 * r.bytes as f64 / bytes.max(1) as f64
            );
        }
        out.push('\n');
    }
    let _ = writeln!(
        out,
        "work per iteration (cost model): {:.3} GFLOP, {:.3} GB moved, {} dispatches",
        flops as f64 * 1e-9,
        bytes as f64 * 1e-9,
        g.nodes.len()
    );
    let mut largest: Vec<&crate::graph::TensorInfo> = g.tensors.iter().collect();
    largest.sort_by_key(|t| std::cmp::Reverse(t.bytes()));
    let _ = writeln!(out, "largest storage bindings (an adapter must allow the first):");
    for t in largest.iter().take(3) {
        let _ = writeln!(out, "  {:.2} MiB  '{}' {:?} {}", mib(t.bytes()), t.name, t.shape, t.dtype.name());
    }
    out.push_str(&memory_line(&m));
    out.push('\n');
    out
}

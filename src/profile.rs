//! Shader-level profiling of a compiled graph: per-kernel and per-layer tables from GPU
//! timestamps, and a Chrome/Perfetto trace with one event per dispatch. A dry run plans a graph
//! without a GPU and reports its memory and the cost model's work.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::json;

use crate::gpu::Context;
use crate::graph::{plan_memory, Graph, MemoryPlan, Plan, Timing};
use crate::ops::calibrate;
/// The peak record lives beside the tuning cache that stores it; kept importable from here.
pub use crate::tune::Peak;

/// A calibration dispatch is grown until it takes this long, so timer resolution and launch
/// overhead stay small against it.
const CALIBRATION_TARGET_NS: f64 = 2e6;
/// Repeats of the final size; the fastest counts (the peak is what the adapter can do).
const CALIBRATION_REPEATS: usize = 3;

/// Best time (ns) of the single dispatch of `g` over `repeats` profiled runs after a warm-up.
fn time_single(ctx: &Context, g: &Graph, repeats: usize) -> Result<(f64, Timing)> {
    let plan = Plan::compile(ctx, g)?;
    plan.run(ctx)?;
    let mut best = f64::INFINITY;
    let mut timing = Timing::GpuTimestamps;
    for _ in 0..repeats.max(1) {
        let t = plan.profile(ctx)?;
        best = best.min(t.ns.iter().sum());
        timing = t.timing;
    }
    Ok((best.max(1.0), timing))
}

/// Grow a calibration size until one dispatch takes `CALIBRATION_TARGET_NS` (or `grow` refuses,
/// or `deadline` passes), then time it `CALIBRATION_REPEATS` times; returns (units of work per
/// second at the best time, timing).
fn calibrate_one(
    ctx: &Context,
    deadline: Instant,
    mut size: usize,
    build: impl Fn(&mut Graph, usize) -> u64,
    grow: impl Fn(usize, f64) -> Option<usize>,
) -> Result<(f64, Timing)> {
    loop {
        let mut g = Graph::new();
        build(&mut g, size);
        let (ns, _) = time_single(ctx, &g, 1)?;
        if ns >= CALIBRATION_TARGET_NS || Instant::now() >= deadline {
            break;
        }
        match grow(size, CALIBRATION_TARGET_NS / ns) {
            Some(next) if next > size => size = next,
            _ => break,
        }
    }
    let mut g = Graph::new();
    let work = build(&mut g, size);
    let (ns, timing) = time_single(ctx, &g, CALIBRATION_REPEATS)?;
    Ok((work as f64 / (ns * 1e-9), timing))
}

/// Measure the adapter's fp32 FMA rate and copy bandwidth with the calibration kernels. Sizes
/// start small and grow (at most ~`budget` of probing), so a CPU adapter is done in well under a
/// second and a large GPU still gets dispatches long enough to time.
pub fn measure_peak(ctx: &Context, budget: Duration) -> Result<Peak> {
    let start = Instant::now();
    const MAX_INVOCATIONS: usize = 1 << 20;
    const MAX_ROUNDS: usize = 1 << 14;
    // Size = invocations * rounds, grown along invocations first (to fill the device), then rounds.
    let (flops, t1) = calibrate_one(
        ctx,
        start + budget / 2,
        (1 << 14) * 8,
        |g, size| {
            let n = size.min(MAX_INVOCATIONS);
            let iters = (size / n).max(1);
            calibrate::fma_rate(g, n, iters, "calibrate.fma");
            n as u64 * iters as u64 * calibrate::FLOPS_PER_ROUND
        },
        |size, factor| {
            let next = (size as f64 * factor.clamp(2.0, 16.0)) as usize;
            (next <= MAX_INVOCATIONS * MAX_ROUNDS).then_some(next)
        },
    )?;
    // Bytes copied per dispatch, capped by what one binding may hold.
    let max_values = (ctx.max_binding_bytes().min(1 << 30) / 4) as usize / 4 * 4;
    let (bytes, t2) = calibrate_one(
        ctx,
        start + budget,
        (1usize << 18).min(max_values),
        |g, values| {
            let src = g.input("calibrate.src", &[values]);
            calibrate::copy_rate(g, src, "calibrate.copy");
            8 * values as u64
        },
        |values, factor| {
            let next = ((values as f64 * factor.clamp(2.0, 16.0)) as usize).min(max_values) / 4 * 4;
            (next > values).then_some(next)
        },
    )?;
    Ok(Peak {
        gflops: flops / 1e9,
        gbps: bytes / 1e9,
        gpu_timestamps: t1 == Timing::GpuTimestamps && t2 == Timing::GpuTimestamps,
    })
}

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
    /// The adapter's measured peak, for the % of peak columns (None: not measured).
    pub peak: Option<Peak>,
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
            ".partials",
            ".final",
            ".channel_sums",
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
pub fn profile(ctx: &Context, plan: &Plan, iters: usize, batch: usize, peak: Option<Peak>) -> Result<Profile> {
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
            let kernel = n.variant.as_ref().map_or_else(|| n.kernel.clone(), |v| format!("{}@{v}", n.kernel));
            for (map, key) in [(&mut kernels, kernel.clone()), (&mut layers, layer_of(&n.label))] {
                let row =
                    map.entry(key.clone()).or_insert(Row { name: key, calls: 0, total_ms: 0.0, flops: 0, bytes: 0 });
                row.calls += 1;
                row.total_ms += ms;
                row.flops += n.cost.flops;
                row.bytes += n.cost.bytes;
            }
            events.push(json!({
                "name": kernel, "cat": layer_of(&n.label), "ph": "X", "pid": 1, "tid": 1,
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
        peak,
    })
}

impl Profile {
    fn table(out: &mut String, title: &str, rows: &[Row], total: f64, peak: Option<Peak>) {
        let _ = writeln!(
            out,
            "{title:<44} {:>6} {:>11} {:>10} {:>7} {:>9} {:>8} {:>7} {:>7}",
            "calls", "total ms", "mean us", "share%", "GFLOP/s", "GB/s", "%FLOP", "%BW"
        );
        // Share of the measured peak; "-" when there is no measurement.
        let pct = |v: f64, peak: Option<f64>| peak.map_or("-".to_string(), |p| format!("{:.1}", 100.0 * v / p));
        for r in rows {
            let _ = writeln!(
                out,
                "{:<44} {:>6} {:>11.3} {:>10.1} {:>7.2} {:>9.2} {:>8.2} {:>7} {:>7}",
                r.name,
                r.calls,
                r.total_ms,
                r.mean_us(),
                100.0 * r.total_ms / total.max(1e-12),
                r.gflops(),
                r.gbps(),
                pct(r.gflops(), peak.map(|p| p.gflops)),
                pct(r.gbps(), peak.map(|p| p.gbps)),
            );
        }
    }

    /// The two tables and the totals, as printed by `sddpm-gpu profile`.
    pub fn render(&self) -> String {
        let total: f64 = self.kernels.iter().map(|r| r.total_ms).sum();
        let mut out = String::new();
        Self::table(&mut out, "kernel", &self.kernels, total, self.peak);
        out.push('\n');
        Self::table(&mut out, "layer", &self.layers, total, self.peak);
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
        if let Some(p) = self.peak {
            let _ = writeln!(
                out,
                "peak: {:.2} GFLOP/s fp32 FMA, {:.2} GB/s copy ({}); %FLOP and %BW are shares of these",
                p.gflops,
                p.gbps,
                if p.gpu_timestamps {
                    "calibration kernels, GPU timestamps"
                } else {
                    "calibration kernels, host timers"
                }
            );
        }
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

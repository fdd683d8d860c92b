//! The autotuner: picks one of the candidate kernels of every tunable node before a graph is
//! compiled. It knows nothing about individual ops: an op family offers [`Variant`]s through
//! [`Graph::push_variants`] (index 0 the default); the tuner times each distinct tuning key
//! (family, shapes, parameters) on the adapter with GPU timestamps, a few runs per candidate within
//! a time bound, keeps the fastest, and stores the choice and every candidate's time in the
//! [`Cache`], so the next run on the same adapter and driver skips the timing.
//!
//! Choice order per key: a pinned choice (a resumed run's record) > tuning off (the default) >
//! the cache > timing. Every choice is recorded in the context's [`Tuning::chosen`].
//!
//! Selection runs on the graph, before memory planning, so a variant's grid and constants are
//! fixed when the plan is built. Candidates whose [`crate::graph::Needs`] the device does not meet
//! are dropped first, then those whose self-check ([`crate::graph::Needs::check`]: the
//! cooperative-matrix kernels') fails on this adapter: each check runs once per adapter and
//! kernel (entry, variant, constants, module source), and its verdict is cached with the tuning
//! results; a failure is one notice line and the node falls back to its other candidates.
//!
//! SDDPM_KERNELS ([`KernelPolicy`]): `coop` puts every node that still has a cooperative-matrix
//! candidate on it (after a pinned choice, before everything else), `f32` opens the device
//! without the feature so that none is offered, `auto` lets the choice order below decide.

mod cache;
mod record;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

pub use cache::{cache_dir, Cache, Entry, Timed, Verdict};
pub use record::{adapter_id, pin_recorded, record_json, Record, METADATA_KEY};

use crate::gpu::{Context, KernelPolicy, Tuning};
use crate::graph::{Graph, Node, Plan, Variant};

/// Profiled runs per candidate after one warm-up run (the best counts).
const RUNS_PER_CANDIDATE: usize = 3;
/// Past this much timing for one key, the remaining candidates get a single run each (no warm-up).
const BUDGET_PER_KEY: Duration = Duration::from_millis(300);

/// What [`select`] did, for notices and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Keys timed on the adapter in this call.
    pub timed: usize,
    /// Keys whose choice came from the cache.
    pub cached: usize,
    /// Keys given a pinned (recorded) choice.
    pub pinned: usize,
    /// Keys left at the default because tuning is off.
    pub defaults: usize,
    /// Keys put on a cooperative-matrix variant by SDDPM_KERNELS=coop.
    pub forced: usize,
    /// Self-checks run on the adapter in this call (the others' verdicts came from the cache).
    pub checks_run: usize,
    /// One notice per variant disabled by a failed self-check.
    pub rejected: Vec<String>,
}

/// Choose the kernel of every tunable node of `g` (see the module documentation).
pub fn select(ctx: &Context, g: &mut Graph) -> Result<Report> {
    let mut report = Report::default();
    if g.variants.is_empty() {
        return Ok(report);
    }
    // Candidates the device cannot run (a feature it lacks, more workgroup memory or invocations
    // than it allows) are not offered at all, so caches and records name only runnable kernels.
    g.retain_candidates(|v| v.needs.met_on(ctx));
    let policy: Tuning = ctx.tuning.lock().unwrap().clone();
    let mut cache: Option<Cache> = None;
    // A checked variant may serve only if tuning may pick it, the policy forces it or a record
    // pins it; otherwise every node runs its default and nothing needs checking.
    if policy.enabled || policy.kernels == KernelPolicy::Coop || !policy.pinned.is_empty() {
        let failed = match run_self_checks(ctx, g, &mut cache, &mut report) {
            Ok(f) => f,
            Err(e) => {
                // An interrupt: keep the verdicts reached so far.
                if let Some(c) = cache.as_mut() {
                    c.save();
                }
                return Err(e);
            }
        };
        if !failed.is_empty() {
            g.retain_candidates(|v| v.needs.check.is_none() || !failed.iter().any(|k| k == &check_key_of(v)));
        }
    }
    let mut decided: BTreeMap<String, usize> = BTreeMap::new();
    let started = Instant::now();
    let nodes: Vec<usize> = g.variants.keys().copied().collect();
    for node in nodes {
        let key = g.tuning_key(node);
        let names: Vec<String> = g.variants[&node].candidates.iter().map(|v| v.name.clone()).collect();
        let index_of = |name: &str| names.iter().position(|n| n == name);
        let index = match decided.get(&key) {
            Some(&i) => i,
            None => {
                let i = if let Some(name) = policy.pinned.get(&key) {
                    report.pinned += 1;
                    match index_of(name) {
                        Some(i) => i,
                        None => bail!(
                            "the run recorded kernel variant '{name}' for {key}, which this build does not offer \
                             on this adapter (it offers {}); rerun without --resume, or with the build and \
                             adapter that made the run",
                            names.join(", ")
                        ),
                    }
                } else if let Some(i) = forced_coop(&policy, &g.variants[&node].candidates) {
                    report.forced += 1;
                    i
                } else if !policy.enabled {
                    report.defaults += 1;
                    0
                } else {
                    let cache = cache.get_or_insert_with(|| Cache::open(ctx));
                    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
                    match cache.get(&key, &refs).and_then(|e| index_of(&e.choice)) {
                        Some(i) => {
                            report.cached += 1;
                            i
                        }
                        None => {
                            let timed = match time_candidates(ctx, g, node) {
                                Ok(t) => t,
                                Err(e) => {
                                    // Keep what was tuned so far (an interrupt is not a reason to
                                    // time those shapes again).
                                    cache.save();
                                    return Err(e);
                                }
                            };
                            report.timed += 1;
                            let best = (0..timed.len())
                                .min_by(|&a, &b| timed[a].us.total_cmp(&timed[b].us))
                                .expect("at least one candidate");
                            cache.insert(key.clone(), Entry { choice: names[best].clone(), candidates: timed });
                            best
                        }
                    }
                };
                decided.insert(key.clone(), i);
                i
            }
        };
        g.choose(node, index);
        ctx.tuning.lock().unwrap().chosen.insert(key, names[index].clone());
    }
    if let Some(mut cache) = cache {
        cache.save();
        if report.checks_run > 0 {
            eprintln!(
                "note: checked {} cooperative-matrix kernel(s) against the f32 path on {}{}",
                report.checks_run,
                ctx.adapter.name,
                cache.path().map_or_else(String::new, |p| format!("; verdicts cached in {}", p.display()))
            );
        }
        if report.timed > 0 {
            eprintln!(
                "note: tuned {} kernel shape(s) on {} in {:.0} ms{}",
                report.timed,
                ctx.adapter.name,
                started.elapsed().as_secs_f64() * 1e3,
                cache.path().map_or_else(String::new, |p| format!("; cached in {}", p.display()))
            );
        }
    }
    Ok(report)
}

/// Under SDDPM_KERNELS=coop, the cooperative-matrix candidate to force (the largest fragment).
fn forced_coop(policy: &Tuning, candidates: &[Variant]) -> Option<usize> {
    if policy.kernels != KernelPolicy::Coop {
        return None;
    }
    (0..candidates.len()).filter(|&i| candidates[i].needs.coop != 0).max_by_key(|&i| candidates[i].needs.coop)
}

/// What a self-check verdict is valid for: module, entry, variant and constants, and the module's
/// source (a changed kernel is checked again).
fn check_key_of(v: &Variant) -> String {
    let shader = v.shader.expect("a checked variant names its module");
    // FNV-1a: stable across builds and platforms, unlike std's hasher.
    let hash = shader.source.bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3));
    format!("{}::{} {} {:?} source {hash:016x}", shader.name, v.entry, v.name, v.constants)
}

/// Run (or recall) the self-check of every distinct checked candidate of `g`; returns the keys of
/// those that failed, each announced once per context with one notice line.
fn run_self_checks(ctx: &Context, g: &Graph, cache: &mut Option<Cache>, report: &mut Report) -> Result<Vec<String>> {
    let mut seen: BTreeMap<String, &Variant> = BTreeMap::new();
    for t in g.variants.values() {
        for v in t.candidates.iter().filter(|v| v.needs.check.is_some()) {
            seen.entry(check_key_of(v)).or_insert(v);
        }
    }
    let mut failed = Vec::new();
    for (key, v) in seen {
        let known = ctx.tuning.lock().unwrap().checks.get(&key).copied();
        let passed = match known {
            Some(passed) => passed,
            None => {
                let cache = cache.get_or_insert_with(|| Cache::open(ctx));
                let verdict = match cache.check(&key) {
                    Some(verdict) => verdict,
                    None => {
                        // Like tuning, checking stops at an interrupt (crate::signal).
                        crate::signal::check()?;
                        report.checks_run += 1;
                        let check = v.needs.check.expect("filtered on a check");
                        match (check.0)(ctx, v) {
                            Ok(o) => {
                                let verdict = Verdict {
                                    passed: o.passed(),
                                    detail: if o.passed() {
                                        format!("relative error {:.1e}", o.error)
                                    } else {
                                        format!("relative error {:.1e} > {:.0e}", o.error, o.limit)
                                    },
                                };
                                cache.insert_check(key.clone(), verdict.clone());
                                verdict
                            }
                            // A check that could not run (the driver rejected the module, memory
                            // ran out) disables the variant in this context but is not cached.
                            Err(e) => {
                                let why = format!("{e:#}").split_whitespace().collect::<Vec<_>>().join(" ");
                                Verdict { passed: false, detail: format!("the check failed to run: {why}") }
                            }
                        }
                    }
                };
                if !verdict.passed {
                    let constants: Vec<String> = v.constants.iter().map(|(c, x)| format!("{c}={x}")).collect();
                    let notice = format!(
                        "note: cooperative-matrix kernel {}::{} {} ({}) disagrees with the f32 path on {} ({}); \
                         not used, the f32 kernels run instead",
                        v.shader.map_or("?", |s| s.name),
                        v.entry,
                        v.name,
                        constants.join(" "),
                        ctx.adapter.name,
                        verdict.detail
                    );
                    eprintln!("{notice}");
                    report.rejected.push(notice);
                }
                ctx.tuning.lock().unwrap().checks.insert(key.clone(), verdict.passed);
                verdict.passed
            }
        };
        if !passed {
            failed.push(key);
        }
    }
    Ok(failed)
}

/// Select kernels (see [`select`]) and compile.
pub fn compile(ctx: &Context, g: &Graph) -> Result<Plan> {
    if g.variants.is_empty() {
        return Plan::compile(ctx, g);
    }
    let mut g = g.clone();
    select(ctx, &mut g)?;
    Plan::compile(ctx, &g)
}

/// Time every candidate of `node` alone, on zero-filled copies of the tensors it binds.
fn time_candidates(ctx: &Context, g: &Graph, node: usize) -> Result<Vec<Timed>> {
    let n = &g.nodes[node];
    let started = Instant::now();
    let mut out = Vec::new();
    for v in &g.variants[&node].candidates {
        // Tuning can take minutes on a slow adapter: an interrupt stops it here (crate::signal).
        crate::signal::check()?;
        let mut mini = Graph::new();
        let mut bind = |ts: &[crate::graph::TensorId]| -> Vec<crate::graph::TensorId> {
            ts.iter().map(|&t| mini.input(&g.info(t).name, g.shape(t))).collect()
        };
        let reads = bind(&n.reads);
        let writes = bind(&n.writes);
        let single: Vec<Variant> = vec![v.clone()];
        let shader = g.variants[&node].shader;
        mini.push_variants(Node { reads, writes, shader, ..n.clone() }, single);
        let plan = Plan::compile(ctx, &mini)?;
        // Past the budget a candidate gets one cold run: enough to rank kernels that differ by
        // multiples (what slow adapters and huge shapes show), and the time stays bounded.
        let within = started.elapsed() < BUDGET_PER_KEY;
        if within {
            plan.run(ctx)?;
        }
        let runs = if within { RUNS_PER_CANDIDATE } else { 1 };
        let mut best = f64::INFINITY;
        for _ in 0..runs {
            best = best.min(plan.profile(ctx)?.ns.iter().sum::<f64>());
        }
        out.push(Timed { variant: v.name.clone(), us: best * 1e-3 });
    }
    Ok(out)
}

//! The autotuner: picks one of the candidate kernels of every tunable node before a graph is
//! compiled. It knows nothing about individual ops: an op family offers [`Variant`]s through
//! [`Graph::push_variants`] (index 0 the default); the tuner times each distinct tuning key
//! (family, shapes, parameters) on the adapter with GPU timestamps, a few runs per candidate within
//! a time bound, keeps the fastest, and stores the choice and every candidate's time in the
//! [`Cache`], so the next run on the same adapter and driver skips the timing.
//!
//! Keys hold for every batch size when the caller also gives the graph built for another batch
//! ([`Batched`], see [`key`]): then training, its sample grids, `sample`, `fid` and `profile` of
//! one model share their measurements, and [`tune_ahead`] times everything a run will need before
//! it starts, under one progress bar.
//!
//! Choice order per key: a pinned choice (a resumed run's record) > a choice already made on this
//! context > tuning off (the default) > the cache > timing. Every choice is recorded in the
//! context's [`Tuning::chosen`] ([`tuning`]).
//!
//! Selection runs on the graph, before memory planning, so a variant's grid and constants are
//! fixed when the plan is built. Candidates whose [`crate::graph::Needs`] the device does not meet
//! are dropped first, then those whose self-check ([`crate::graph::Needs::check`]: the
//! cooperative-matrix kernels') fails on this adapter: each check runs once per adapter and
//! kernel (entry, variant, constants, module source), and its verdict is cached with the tuning
//! results; a failure is one notice line and the node falls back to its other candidates. A graph
//! the adapter cannot hold at all (a tensor larger than a storage binding may be) is refused
//! before anything is checked or timed.
//!
//! SDDPM_KERNELS ([`KernelPolicy`]): `coop` puts every node that still has a cooperative-matrix
//! candidate on it (after a pinned choice, before everything else), `f32` opens the device
//! without the feature so that none is offered, `auto` lets the choice order below decide.
//!
//! Design (the variants on offer, the self-checks, cooperative matrices): docs/kernels.md.

mod cache;
mod key;
mod policy;
mod record;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

pub use cache::{cache_dir, Cache, Entry, Peak, Timed, Verdict};
pub use key::{general_key, other_batch};
pub use policy::{tuning, Tuning};
pub use record::{adapter_id, pin_recorded, record_json, Record, METADATA_KEY};

use crate::gpu::{Context, KernelPolicy};
use crate::graph::{Graph, Node, Plan, Variant};
use crate::progress::Progress;

/// Profiled runs per candidate after one warm-up run (the best counts).
const RUNS_PER_CANDIDATE: usize = 3;
/// Past this much timing for one key, the remaining candidates get a single run each (no warm-up).
const BUDGET_PER_KEY: Duration = Duration::from_millis(300);

/// What [`select`] did, for notices and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Keys timed on the adapter in this call.
    pub timed: usize,
    /// Keys whose choice came from the cache (or an earlier choice on this context).
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

/// A graph built for `batch` images, with the same graph built for `other_batch` (see
/// [`other_batch`]): the pair from which tuning keys learn which numbers follow the batch.
#[derive(Clone, Copy)]
pub struct Batched<'a> {
    pub graph: &'a Graph,
    pub batch: usize,
    pub other: &'a Graph,
    pub other_batch: usize,
}

/// A graph being selected, and its batch pair if it has one.
struct Job<'a> {
    g: Graph,
    other: Option<(&'a Graph, usize, usize)>,
}

/// Choose the kernel of every tunable node of `g` (see the module documentation), with keys
/// exact in every shape.
pub fn select(ctx: &Context, g: &mut Graph) -> Result<Report> {
    let mut jobs = [Job { g: std::mem::take(g), other: None }];
    let report = select_jobs(ctx, &mut jobs);
    *g = std::mem::take(&mut jobs[0].g);
    report
}

/// Select kernels with keys exact in every shape (see [`select`]) and compile.
pub fn compile(ctx: &Context, g: &Graph) -> Result<Plan> {
    if g.variants.is_empty() {
        return Plan::compile(ctx, g);
    }
    let mut g = g.clone();
    select(ctx, &mut g)?;
    Plan::compile(ctx, &g)
}

/// Select kernels with keys that hold for every batch size (see [`Batched`]) and compile
/// `b.graph`.
pub fn compile_batched(ctx: &Context, b: Batched) -> Result<Plan> {
    let mut jobs = [Job { g: b.graph.clone(), other: Some((b.other, b.batch, b.other_batch)) }];
    select_jobs(ctx, &mut jobs)?;
    Plan::compile(ctx, &jobs[0].g)
}

/// Time, before a long job starts, every kernel shape its graphs will need (a training step,
/// the sampler of its grids and FID samples), under one progress bar, so nothing is timed
/// mid-run; the choices are recorded on `ctx` for the plans compiled later.
pub fn tune_ahead(ctx: &Context, graphs: &[Batched]) -> Result<Report> {
    let mut jobs: Vec<Job> =
        graphs.iter().map(|b| Job { g: b.graph.clone(), other: Some((b.other, b.batch, b.other_batch)) }).collect();
    select_jobs(ctx, &mut jobs)
}

/// Every tensor of `g` fits a storage binding of the adapter; else one line naming the tensor,
/// its size and the limit. Checked before anything is timed: a model the adapter cannot hold is
/// refused at once, not after minutes of tuning.
pub fn check_fits(ctx: &Context, g: &Graph) -> Result<()> {
    g.check()?;
    Plan::check_limits(ctx, g)
}

/// The key of every tunable node of `job`, in node order: (node, key, exact key). Keys generalise
/// over the batch where the job has its batch pair and the i-th tunable nodes of both line up.
fn job_keys(job: &Job) -> Vec<(usize, String, String)> {
    let nodes: Vec<usize> = job.g.variants.keys().copied().collect();
    let others: Vec<usize> = job.other.map_or_else(Vec::new, |(o, _, _)| o.variants.keys().copied().collect());
    nodes
        .iter()
        .enumerate()
        .map(|(i, &node)| {
            let exact = job.g.tuning_key(node);
            let general = match job.other {
                Some((other, batch, other_batch)) if others.len() == nodes.len() => {
                    general_key(&exact, batch, &other.tuning_key(others[i]), other_batch)
                }
                _ => None,
            };
            (node, general.unwrap_or_else(|| exact.clone()), exact)
        })
        .collect()
}

/// What was decided for a key: the candidates it was decided over and the choice.
struct Decided {
    names: Vec<String>,
    choice: String,
}

fn select_jobs(ctx: &Context, jobs: &mut [Job]) -> Result<Report> {
    let mut report = Report::default();
    for job in jobs.iter() {
        check_fits(ctx, &job.g)?;
    }
    // Candidates the device cannot run (a feature it lacks, more workgroup memory or invocations
    // than it allows) are not offered at all, so caches and records name only runnable kernels.
    for job in jobs.iter_mut() {
        job.g.retain_candidates(|v| v.needs.met_on(ctx));
    }
    let policy: Tuning = tuning(ctx).lock().unwrap().clone();
    let mut cache: Option<Cache> = None;
    // A checked variant may serve only if tuning may pick it, the policy forces it or a record
    // pins it; otherwise every node runs its default and nothing needs checking.
    if policy.enabled || ctx.kernels == KernelPolicy::Coop || !policy.pinned.is_empty() {
        for job in jobs.iter_mut() {
            let failed = match run_self_checks(ctx, &job.g, &mut cache, &mut report) {
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
                job.g.retain_candidates(|v| v.needs.check.is_none() || !failed.iter().any(|k| k == &check_key_of(v)));
            }
        }
    }
    let mut decided: BTreeMap<String, Decided> = BTreeMap::new();
    // (job, node, key): nodes whose key was decided here, in order; keys left to time.
    let mut assigned: Vec<(usize, usize, String)> = Vec::new();
    let mut to_time: Vec<(usize, usize, String, String)> = Vec::new();
    for (j, job) in jobs.iter().enumerate() {
        for (node, general, exact) in job_keys(job) {
            let names: Vec<String> = job.g.variants[&node].candidates.iter().map(|v| v.name.clone()).collect();
            // Nodes that share a key share a decision, over the same candidates; a node offering
            // other candidates under a general key falls back to its exact one.
            let key = match decided.get(&general) {
                Some(d) if d.names != names => exact.clone(),
                _ => general,
            };
            if let Some(d) = decided.get(&key) {
                if d.names != names {
                    bail!(
                        "kernel shape {key} offers different candidates in two nodes ({} and {})",
                        d.names.join(", "),
                        names.join(", ")
                    );
                }
                assigned.push((j, node, key));
                continue;
            }
            let offered = |name: &String| names.contains(name);
            let choice = if let Some(name) = policy.pinned.get(&key).or_else(|| policy.pinned.get(&exact)) {
                report.pinned += 1;
                if !offered(name) {
                    bail!(
                        "the run recorded kernel variant '{name}' for {key}, which this build does not offer \
                         on this adapter (it offers {}); rerun without --resume, or with the build and \
                         adapter that made the run",
                        names.join(", ")
                    );
                }
                Some(name.clone())
            } else if let Some(i) = forced_coop(ctx.kernels, &job.g.variants[&node].candidates) {
                report.forced += 1;
                Some(names[i].clone())
            } else if let Some(name) = policy.chosen.get(&key).filter(|n| offered(n)) {
                report.cached += 1;
                Some(name.clone())
            } else if !policy.enabled {
                report.defaults += 1;
                Some(names[0].clone())
            } else {
                let cache = cache.get_or_insert_with(|| Cache::open(ctx));
                let refs: Vec<&str> = names.iter().map(String::as_str).collect();
                match cache.get(&key, &refs).or_else(|| cache.get(&exact, &refs)) {
                    Some(e) => {
                        report.cached += 1;
                        Some(e.choice.clone())
                    }
                    None => {
                        to_time.push((j, node, key.clone(), exact));
                        None
                    }
                }
            };
            // Keys to time are decided below; the placeholder keeps later nodes of the key waiting.
            decided.insert(key.clone(), Decided { names, choice: choice.unwrap_or_default() });
            assigned.push((j, node, key));
        }
    }
    if !to_time.is_empty() {
        let started = Instant::now();
        let cache = cache.get_or_insert_with(|| Cache::open(ctx));
        let n = to_time.len();
        eprintln!(
            "tuning {n} kernel shape{} on {} (once per adapter and model; cached{}; --no-tune skips it)",
            if n == 1 { "" } else { "s" },
            ctx.adapter.name,
            cache.path().map_or_else(String::new, |p| format!(" in {}", p.display()))
        );
        let bar = Progress::with_template(
            "tuning",
            n as u64,
            "kernel shapes",
            &format!("tuning {n} kernel shapes {{bar:30}} {{pos}}/{{len}}, eta {{eta}}"),
        );
        for (j, node, key, exact) in to_time {
            let timed = match time_candidates(ctx, &jobs[j].g, node) {
                Ok(t) => t,
                Err(e) => {
                    // Keep what was tuned so far (an interrupt is not a reason to time those
                    // shapes again).
                    bar.abandon();
                    cache.save();
                    return Err(e);
                }
            };
            let best =
                (0..timed.len()).min_by(|&a, &b| timed[a].us.total_cmp(&timed[b].us)).expect("at least one candidate");
            let choice = timed[best].variant.clone();
            let timed_on = (exact != key).then_some(exact);
            cache.insert(key.clone(), Entry { choice: choice.clone(), candidates: timed, timed_on });
            decided.get_mut(&key).expect("decided above").choice = choice;
            report.timed += 1;
            bar.inc(1);
        }
        bar.finish_and_clear();
        cache.save();
        eprintln!(
            "note: tuned {} kernel shape(s) on {} in {:.0} ms{}",
            report.timed,
            ctx.adapter.name,
            started.elapsed().as_secs_f64() * 1e3,
            cache.path().map_or_else(String::new, |p| format!("; cached in {}", p.display()))
        );
    } else if let Some(cache) = cache.as_mut() {
        cache.save();
    }
    if report.checks_run > 0 {
        eprintln!(
            "note: checked {} cooperative-matrix kernel(s) against the f32 path on {}{}",
            report.checks_run,
            ctx.adapter.name,
            cache
                .as_ref()
                .and_then(|c| c.path())
                .map_or_else(String::new, |p| format!("; verdicts cached in {}", p.display()))
        );
    }
    let state = tuning(ctx);
    let mut tuning = state.lock().unwrap();
    for (j, node, key) in assigned {
        let d = &decided[&key];
        let index = d.names.iter().position(|n| *n == d.choice).expect("the choice is a candidate");
        jobs[j].g.choose(node, index);
        tuning.chosen.insert(key, d.choice.clone());
    }
    Ok(report)
}

/// Under SDDPM_KERNELS=coop, the cooperative-matrix candidate to force (the largest fragment).
fn forced_coop(kernels: KernelPolicy, candidates: &[Variant]) -> Option<usize> {
    if kernels != KernelPolicy::Coop {
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
        let known = tuning(ctx).lock().unwrap().checks.get(&key).copied();
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
                tuning(ctx).lock().unwrap().checks.insert(key.clone(), verdict.passed);
                verdict.passed
            }
        };
        if !passed {
            failed.push(key);
        }
    }
    Ok(failed)
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

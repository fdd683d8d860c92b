//! Compile a [`Graph`] once into GPU objects, then replay it.
//!
//! Compilation creates every buffer (one per planned slot), one uniform buffer holding all nodes'
//! parameters at aligned offsets, the pipelines (cached per shader entry) and one bind group per
//! node. A run only records dispatches: at most `DISPATCHES_PER_SUBMIT` per command buffer (one
//! compute pass each; wgpu inserts the barriers between dispatches) and at most `MAX_IN_FLIGHT`
//! submissions queued before the host waits for the oldest, so a long graph neither starves the
//! GPU nor queues unbounded work.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use anyhow::{bail, Result};

use super::{plan_memory, unpack_spikes, DType, Graph, MemoryPlan, Role, TensorId, TensorInfo};
use crate::gpu::Context;

const DISPATCHES_PER_SUBMIT: usize = 1024;
/// Every node's uniform binding is this wide (its words, zero-padded), so a shader's Params struct
/// may be longer than what a particular entry point's node fills in.
const PARAMS_WINDOW: u64 = 4 * super::MAX_PARAM_WORDS as u64;
const MAX_IN_FLIGHT: usize = 3;

/// Bytes of poison after every tensor of a guarded plan ([`Plan::compile_guarded`]).
pub const GUARD_BYTES: u64 = 1024;
/// The guard word: a quiet NaN as f32, a scatter of set bits as spikes, a huge u32 index.
const POISON: u32 = 0x7fc0_dead;

struct CompiledNode {
    pipeline: Arc<wgpu::ComputePipeline>,
    bind_group: wgpu::BindGroup,
    workgroups: [u32; 3],
    params_offset: u64,
}

/// How [`Plan::profile`] measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timing {
    /// GPU timestamp queries around each dispatch.
    GpuTimestamps,
    /// The adapter has no timestamp queries: each dispatch submitted alone and timed on the host
    /// (includes submit overhead).
    HostTimers,
}

/// Per-dispatch times of one profiled run.
#[derive(Debug, Clone)]
pub struct NodeTimes {
    /// Duration of each dispatch.
    pub ns: Vec<f64>,
    /// Start of each dispatch, relative to the first.
    pub start_ns: Vec<f64>,
    pub timing: Timing,
}

/// Timestamp query sets (reused across profiled runs), with their resolve and staging buffers.
struct QueryPool {
    sets: Vec<(wgpu::QuerySet, wgpu::Buffer, wgpu::Buffer)>,
}

const QUERIES_PER_SET: u32 = wgpu::QUERY_SET_MAX_QUERIES;

/// What the profiler reports about a dispatch.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    /// "shader::entry".
    pub kernel: String,
    /// The variant chosen for this dispatch; None for kernels that have no alternatives.
    pub variant: Option<String>,
    /// The op / model layer it belongs to.
    pub label: String,
    pub cost: super::Cost,
}

/// What one run did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunStats {
    pub dispatches: usize,
    pub submits: usize,
}

/// Offset of each node's parameter window in the shared uniform buffer. Every node binds a whole
/// `PARAMS_WINDOW`, so offsets step by the larger of the window and the device's offset alignment:
/// aligning only to the latter (32 B on lavapipe) would let a node's window overlap the next node's
/// words, and a shader whose Params struct is longer than its node's words would read them.
fn param_offsets(nodes: usize, min_align: u64) -> Vec<u64> {
    let stride = PARAMS_WINDOW.div_ceil(min_align) * min_align;
    (0..nodes as u64).map(|i| i * stride).collect()
}

/// A compiled graph: buffers, pipelines and bind groups, ready to replay.
pub struct Plan {
    tensors: Vec<TensorInfo>,
    memory: MemoryPlan,
    buffers: Vec<wgpu::Buffer>,
    params: wgpu::Buffer,
    nodes: Vec<CompiledNode>,
    staging: HashMap<TensorId, wgpu::Buffer>,
    queries: std::sync::Mutex<Option<QueryPool>>,
    info: Vec<NodeInfo>,
    /// Poisoned bytes bound after every tensor (0 unless [`Plan::compile_guarded`]).
    guard: u64,
    /// Bytes from each arena member's start to the next member (or the arena's end).
    extents: Vec<u64>,
}

/// For each arena member, the bytes from its offset to the next member's (or its arena's end):
/// itself and the padding after it. 0 for tensors outside arenas.
fn member_extents(tensors: &[TensorInfo]) -> Vec<u64> {
    let mut starts: HashMap<usize, Vec<u64>> = HashMap::new();
    for t in tensors {
        if let Some(v) = t.view {
            starts.entry(v.base.0).or_default().push(v.offset);
        }
    }
    for (base, offs) in starts.iter_mut() {
        offs.push(tensors[*base].bytes());
        offs.sort_unstable();
    }
    tensors
        .iter()
        .map(|t| {
            t.view.map_or(0, |v| {
                let offs = &starts[&v.base.0];
                let k = offs.partition_point(|&o| o <= v.offset);
                offs[k] - v.offset
            })
        })
        .collect()
}

impl Plan {
    pub fn compile(ctx: &Context, g: &Graph) -> Result<Plan> {
        Self::compile_with_guard(ctx, g, 0)
    }

    /// As [`Plan::compile`], for tests that hunt out-of-bounds kernels: every tensor gets a buffer
    /// of its own with [`GUARD_BYTES`] of poison after it, bound together with the tensor, so
    /// neither wgpu's bounds checks nor the driver's robust buffer access hide an access past the
    /// end. A read past the end sees NaN (or stray spikes); a write past the end shows in
    /// [`Plan::check_guards`]. Kernels that size themselves with `arrayLength` see the guard too.
    /// Tensors in an arena share the arena's buffer (with the guard after the arena); the padding
    /// between members is poisoned and bound after each member the same way.
    pub fn compile_guarded(ctx: &Context, g: &Graph) -> Result<Plan> {
        Self::compile_with_guard(ctx, g, GUARD_BYTES)
    }

    /// Every tensor of `g` fits one storage binding of the adapter; else one line naming the
    /// first that does not, its size and the limit. Cheap (no GPU work), so callers run it before
    /// anything slow (crate::tune checks it before timing kernels).
    pub fn check_limits(ctx: &Context, g: &Graph) -> Result<()> {
        let max_binding = ctx.max_binding_bytes();
        if let Some(t) = g.tensors.iter().find(|t| t.bytes() > max_binding) {
            bail!(
                "tensor '{}' {:?} needs {} MiB but {} allows {} MiB per storage binding; \
                 use a smaller batch, image size or width",
                t.name,
                t.shape,
                t.bytes() >> 20,
                ctx.adapter.name,
                max_binding >> 20
            );
        }
        Ok(())
    }

    fn compile_with_guard(ctx: &Context, g: &Graph, guard: u64) -> Result<Plan> {
        g.check()?;
        let mut memory = plan_memory(g);
        if guard > 0 {
            // Every tensor outside an arena gets a buffer of its own; members share their arena's.
            let mut slot_bytes = Vec::new();
            for (i, t) in g.tensors.iter().enumerate() {
                if memory.slot[i].is_some() && t.view.is_none() {
                    memory.slot[i] = Some(slot_bytes.len());
                    slot_bytes.push(t.bytes() + guard);
                }
            }
            for (i, t) in g.tensors.iter().enumerate() {
                if let Some(v) = t.view {
                    memory.slot[i] = memory.slot[v.base.0];
                }
            }
            memory.slot_bytes = slot_bytes;
        }
        Self::check_limits(ctx, g)?;
        let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
        let buffers = memory
            .slot_bytes
            .iter()
            .enumerate()
            .map(|(i, &bytes)| ctx.create_buffer(&format!("slot{i}"), bytes, usage))
            .collect::<Result<Vec<_>>>()?;
        let extents = member_extents(&g.tensors);
        if guard > 0 {
            let poison = vec![POISON; guard as usize / 4];
            for (slot, t) in memory.slot.iter().zip(&g.tensors) {
                if let (Some(slot), None) = (slot, t.view) {
                    ctx.queue.write_buffer(&buffers[*slot], t.bytes(), bytemuck::cast_slice(&poison));
                }
            }
            // An arena's padding (between members, after the last) is poisoned like a guard.
            for (i, t) in g.tensors.iter().enumerate() {
                if let (Some(v), Some(slot)) = (t.view, memory.slot[i]) {
                    let pad = extents[i] - t.bytes();
                    if pad > 0 {
                        let words = vec![POISON; pad as usize / 4];
                        ctx.queue.write_buffer(&buffers[slot], v.offset + t.bytes(), bytemuck::cast_slice(&words));
                    }
                }
            }
        }
        for (i, t) in g.tensors.iter().enumerate() {
            if let (Some(init), Some(slot)) = (&t.init, memory.slot[i]) {
                let offset = t.view.map_or(0, |v| v.offset);
                ctx.queue.write_buffer(&buffers[slot], offset, bytemuck::cast_slice(init));
            }
        }

        let align = ctx.limits.min_uniform_buffer_offset_alignment as u64;
        let offsets = param_offsets(g.nodes.len(), align);
        let mut words: Vec<u32> = vec![0; offsets.last().map_or(0, |&o| (o + PARAMS_WINDOW) as usize / 4)];
        for (node, &start) in g.nodes.iter().zip(&offsets) {
            let at = start as usize / 4;
            words[at..at + node.params.len()].copy_from_slice(&node.params);
        }
        memory.params_bytes = offsets.last().map_or(0, |o| o + PARAMS_WINDOW).max(PARAMS_WINDOW);
        debug_assert_eq!(memory.params_bytes, super::planner::params_buffer_bytes(&g.nodes, align));
        let params = ctx.create_buffer(
            "node params",
            memory.params_bytes,
            wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        )?;
        if !words.is_empty() {
            ctx.queue.write_buffer(&params, 0, bytemuck::cast_slice(&words));
        }

        let mut nodes = Vec::with_capacity(g.nodes.len());
        for (i, (node, &params_offset)) in g.nodes.iter().zip(&offsets).enumerate() {
            let variant = g.variants.get(&i).map(|t| t.variant());
            let constants = variant.map_or(&[][..], |v| &v.constants[..]);
            let zero_init = variant.is_none_or(|v| !v.writes_workgroup_memory_first);
            let pipeline = ctx.pipeline_with(node.shader, node.entry, constants, zero_init)?;
            let layout = pipeline.get_bind_group_layout(0);
            let mut entries = vec![wgpu::BindGroupEntry {
                binding: 0,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: &params,
                    offset: params_offset,
                    size: std::num::NonZeroU64::new(PARAMS_WINDOW),
                }),
            }];
            for (k, t) in node.reads.iter().chain(&node.writes).enumerate() {
                // A guarded plan binds the poison after a tensor too: the guard, or for an arena
                // member its padding up to the next member.
                let info = &g.tensors[t.0];
                let size = match (guard, info.view) {
                    (0, _) => info.bytes(),
                    (_, Some(_)) => extents[t.0],
                    _ => info.bytes() + guard,
                };
                entries.push(wgpu::BindGroupEntry {
                    binding: k as u32 + 1,
                    resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                        buffer: &buffers[memory.slot_of(*t)],
                        offset: info.view.map_or(0, |v| v.offset),
                        size: std::num::NonZeroU64::new(size),
                    }),
                });
            }
            let bind_group = ctx
                .bind_group(&wgpu::BindGroupDescriptor { label: Some(&node.label), layout: &layout, entries: &entries })
                .map_err(|e| {
                    e.context(format!("binding node '{}' ({}::{})", node.label, node.shader.name, node.entry))
                })?;
            nodes.push(CompiledNode { pipeline, bind_group, workgroups: node.workgroups, params_offset });
        }

        let mut staging = HashMap::new();
        for (i, t) in g.tensors.iter().enumerate() {
            if t.output {
                let buf = ctx.create_buffer(
                    &format!("staging {}", t.name),
                    t.bytes(),
                    wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                )?;
                staging.insert(TensorId(i), buf);
            }
        }
        let info = g
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| NodeInfo {
                kernel: format!("{}::{}", n.shader.name, n.entry),
                variant: g.variants.get(&i).map(|t| t.variant().name.clone()),
                label: n.label.clone(),
                cost: n.cost,
            })
            .collect();
        Ok(Plan {
            tensors: g.tensors.clone(),
            memory,
            buffers,
            params,
            nodes,
            staging,
            queries: Default::default(),
            info,
            guard,
            extents,
        })
    }

    /// For a plan from [`Plan::compile_guarded`]: fail, naming the tensor, if any kernel wrote
    /// past the end of a tensor into its poisoned guard.
    pub fn check_guards(&self, ctx: &Context) -> Result<()> {
        if self.guard == 0 {
            bail!("check_guards needs a plan from Plan::compile_guarded");
        }
        for (i, (slot, t)) in self.memory.slot.iter().zip(&self.tensors).enumerate() {
            let Some(slot) = slot else { continue };
            let (start, end) = match t.view {
                Some(v) => (v.offset, v.offset + self.extents[i]),
                None => (0, t.bytes() + self.guard),
            };
            let words = ctx.read_buffer_range(&self.buffers[*slot], start, end - start)?;
            if let Some(k) = words[t.bytes() as usize / 4..].iter().position(|&w| w != POISON) {
                bail!(
                    "a kernel wrote past the end of tensor '{}' {:?} ({} bytes): {} word {k} changed",
                    t.name,
                    t.shape,
                    t.bytes(),
                    if t.view.is_some() { "arena padding" } else { "guard" }
                );
            }
        }
        Ok(())
    }

    /// Kernel, label and cost of every dispatch, in order.
    pub fn nodes(&self) -> &[NodeInfo] {
        &self.info
    }

    pub fn memory(&self) -> &MemoryPlan {
        &self.memory
    }

    /// Upload the data of an input or param tensor: its storage words (f32 values, u32 values, or
    /// packed spikes as [`super::pack_spikes`] makes them).
    pub fn write<T: bytemuck::Pod>(&self, ctx: &Context, t: TensorId, data: &[T]) -> Result<()> {
        let info = &self.tensors[t.0];
        if info.role == Role::Intermediate {
            bail!("tensor '{}' is an intermediate; only inputs and params can be written", info.name);
        }
        let bytes: &[u8] = bytemuck::cast_slice(data);
        if bytes.len() as u64 != info.bytes() {
            bail!(
                "tensor '{}' {:?} ({}) holds {} words, got {}",
                info.name,
                info.shape,
                info.dtype.name(),
                info.bytes() / 4,
                bytes.len() / 4
            );
        }
        ctx.queue.write_buffer(&self.buffers[self.memory.slot_of(t)], info.view.map_or(0, |v| v.offset), bytes);
        Ok(())
    }

    /// Replace one node's uniform parameters (same length) before the next run.
    pub fn set_params(&self, ctx: &Context, node: usize, params: &[u32]) {
        ctx.queue.write_buffer(&self.params, self.nodes[node].params_offset, bytemuck::cast_slice(params));
    }

    /// Record and submit every dispatch; returns without waiting for the last submission.
    pub fn run(&self, ctx: &Context) -> Result<RunStats> {
        self.replay(ctx, 0..self.nodes.len(), 1, None)
    }

    /// Record and submit the dispatches of nodes `nodes` only (graph node indices), without
    /// waiting: a step submitted in segments, as the data-parallel trainer does to read each
    /// gradient bucket as soon as the backward has finished it. Segments must be submitted in
    /// order and cover every node once per step.
    pub fn run_nodes(&self, ctx: &Context, nodes: std::ops::Range<usize>) -> Result<RunStats> {
        if nodes.start > nodes.end || nodes.end > self.nodes.len() {
            bail!("nodes {nodes:?} are not a range of this plan's {} nodes", self.nodes.len());
        }
        self.replay(ctx, nodes, 1, None)
    }

    /// Replay the whole node list `reps` times back to back (the sampling loop: GPU-side state
    /// such as a step counter advances between replays). Dispatches are packed into command
    /// buffers of at most `DISPATCHES_PER_SUBMIT` (whole replays share one when they fit), one
    /// compute pass per replay chunk. `progress(replays_done)` counts replays the GPU has
    /// finished, not merely submitted: it is called as each submission completes (the host waits
    /// for the oldest one whenever `MAX_IN_FLIGHT` are queued, and for the rest at the end), so a
    /// progress bar fed from it shows real work and a real rate. Returns when all are done.
    pub fn run_repeated(&self, ctx: &Context, reps: usize, progress: &mut dyn FnMut(usize)) -> Result<RunStats> {
        self.replay(ctx, 0..self.nodes.len(), reps, Some(progress))
    }

    fn replay(
        &self,
        ctx: &Context,
        range: std::ops::Range<usize>,
        reps: usize,
        mut progress: Option<&mut dyn FnMut(usize)>,
    ) -> Result<RunStats> {
        let mut stats = RunStats::default();
        let wait_all = progress.is_some();
        // Each submission with the number of replays complete once it is done.
        let mut in_flight: VecDeque<(wgpu::SubmissionIndex, usize)> = VecDeque::new();
        ctx.scoped("running a compiled graph", || -> Result<()> {
            let mut enc = ctx.device.create_command_encoder(&Default::default());
            let mut pending = 0usize;
            let mut done = |in_flight: &mut VecDeque<(wgpu::SubmissionIndex, usize)>, keep: usize| -> Result<()> {
                while in_flight.len() > keep {
                    let (index, reps_done) = in_flight.pop_front().expect("a submission in flight");
                    ctx.wait_for(index)?;
                    if let Some(p) = progress.as_mut() {
                        p(reps_done);
                    }
                }
                Ok(())
            };
            let mut submit = |enc: wgpu::CommandEncoder, reps_done: usize, stats: &mut RunStats| -> Result<()> {
                in_flight.push_back((ctx.queue.submit([enc.finish()]), reps_done));
                stats.submits += 1;
                done(&mut in_flight, MAX_IN_FLIGHT)
            };
            for rep in 0..reps {
                for chunk in self.nodes[range.clone()].chunks(DISPATCHES_PER_SUBMIT) {
                    if pending > 0 && pending + chunk.len() > DISPATCHES_PER_SUBMIT {
                        let full = std::mem::replace(&mut enc, ctx.device.create_command_encoder(&Default::default()));
                        // Replays before `rep` are whole in what was recorded so far.
                        submit(full, rep, &mut stats)?;
                        pending = 0;
                    }
                    let mut pass = enc.begin_compute_pass(&Default::default());
                    for n in chunk {
                        pass.set_pipeline(&n.pipeline);
                        pass.set_bind_group(0, &n.bind_group, &[]);
                        let [x, y, z] = n.workgroups;
                        pass.dispatch_workgroups(x, y, z);
                    }
                    pending += chunk.len();
                    stats.dispatches += chunk.len();
                }
            }
            if pending > 0 {
                submit(enc, reps, &mut stats)?;
            }
            if wait_all {
                done(&mut in_flight, 0)?;
            }
            Ok(())
        })??;
        Ok(stats)
    }

    /// Run once, timing every dispatch. With TIMESTAMP_QUERY each dispatch gets its own compute
    /// pass with begin/end timestamps; the query sets are pooled across calls and resolved into
    /// buffers inside the same command buffers, then read once after the last submit, so the GPU
    /// never waits for the host mid-run. Without timestamps each dispatch is submitted and waited
    /// for alone (host timers; includes submit overhead).
    pub fn profile(&self, ctx: &Context) -> Result<NodeTimes> {
        if !ctx.features.contains(wgpu::Features::TIMESTAMP_QUERY) {
            let mut ns = Vec::with_capacity(self.nodes.len());
            let mut start_ns = Vec::with_capacity(self.nodes.len());
            let origin = std::time::Instant::now();
            for n in &self.nodes {
                let start = std::time::Instant::now();
                start_ns.push(start.duration_since(origin).as_nanos() as f64);
                let mut enc = ctx.device.create_command_encoder(&Default::default());
                {
                    let mut pass = enc.begin_compute_pass(&Default::default());
                    pass.set_pipeline(&n.pipeline);
                    pass.set_bind_group(0, &n.bind_group, &[]);
                    let [x, y, z] = n.workgroups;
                    pass.dispatch_workgroups(x, y, z);
                }
                ctx.queue.submit([enc.finish()]);
                ctx.wait()?;
                ns.push(start.elapsed().as_nanos() as f64);
            }
            return Ok(NodeTimes { ns, start_ns, timing: Timing::HostTimers });
        }
        let per_set = (QUERIES_PER_SET / 2) as usize;
        let sets_needed = self.nodes.len().div_ceil(per_set).max(1);
        let mut guard = self.queries.lock().unwrap();
        let pool = guard.get_or_insert_with(|| QueryPool { sets: Vec::new() });
        while pool.sets.len() < sets_needed {
            let bytes = QUERIES_PER_SET as u64 * 8;
            let qs = ctx.scoped("creating a timestamp query set", || {
                ctx.device.create_query_set(&wgpu::QuerySetDescriptor {
                    label: Some("profile"),
                    ty: wgpu::QueryType::Timestamp,
                    count: QUERIES_PER_SET,
                })
            })?;
            let resolve = ctx.create_buffer(
                "profile resolve",
                bytes,
                wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            )?;
            let staging = ctx.create_buffer(
                "profile staging",
                bytes,
                wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            )?;
            pool.sets.push((qs, resolve, staging));
        }
        ctx.scoped("profiling a compiled graph", || -> Result<()> {
            for (chunk, (qs, resolve, staging)) in self.nodes.chunks(per_set).zip(&pool.sets) {
                let mut enc = ctx.device.create_command_encoder(&Default::default());
                for (i, n) in chunk.iter().enumerate() {
                    let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                        label: None,
                        timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                            query_set: qs,
                            beginning_of_pass_write_index: Some(2 * i as u32),
                            end_of_pass_write_index: Some(2 * i as u32 + 1),
                        }),
                    });
                    pass.set_pipeline(&n.pipeline);
                    pass.set_bind_group(0, &n.bind_group, &[]);
                    let [x, y, z] = n.workgroups;
                    pass.dispatch_workgroups(x, y, z);
                }
                let used = 2 * chunk.len() as u32;
                enc.resolve_query_set(qs, 0..used, resolve, 0);
                enc.copy_buffer_to_buffer(resolve, 0, staging, 0, used as u64 * 8);
                ctx.queue.submit([enc.finish()]);
            }
            Ok(())
        })??;
        let period = ctx.queue.get_timestamp_period() as f64;
        let mut ns = Vec::with_capacity(self.nodes.len());
        let mut starts: Vec<u64> = Vec::with_capacity(self.nodes.len());
        for (chunk, (_, _, staging)) in self.nodes.chunks(per_set).zip(&pool.sets) {
            let bytes = 2 * chunk.len() as u64 * 8;
            let slice = staging.slice(0..bytes);
            let (tx, rx) = std::sync::mpsc::channel();
            slice.map_async(wgpu::MapMode::Read, move |r| {
                let _ = tx.send(r);
            });
            ctx.wait()?;
            rx.recv()
                .map_err(|_| anyhow::anyhow!("timestamp readback never completed"))?
                .map_err(|e| anyhow::anyhow!("mapping timestamps failed: {e}"))?;
            {
                let view = slice.get_mapped_range().map_err(|e| anyhow::anyhow!("reading timestamps failed: {e}"))?;
                let ticks: &[u64] = bytemuck::cast_slice(&view);
                for pair in ticks.chunks(2) {
                    ns.push(pair[1].saturating_sub(pair[0]) as f64 * period);
                    starts.push(pair[0]);
                }
            }
            staging.unmap();
        }
        let origin = starts.iter().copied().min().unwrap_or(0);
        let start_ns = starts.iter().map(|&t| (t - origin) as f64 * period).collect();
        Ok(NodeTimes { ns, start_ns, timing: Timing::GpuTimestamps })
    }

    /// Read a tensor back as its raw storage words (waits for the GPU).
    pub fn read_u32(&self, ctx: &Context, t: TensorId) -> Result<Vec<u32>> {
        let info = &self.tensors[t.0];
        if info.role == Role::Intermediate && !info.output {
            bail!("tensor '{}' is an intermediate whose buffer is reused; mark it as output to read it", info.name);
        }
        let src = &self.buffers[self.memory.slot_of(t)];
        let offset = info.view.map_or(0, |v| v.offset);
        match self.staging.get(&t) {
            Some(staging) => ctx.read_via(src, offset, staging, info.bytes()),
            None => ctx.read_buffer_range(src, offset, info.bytes()),
        }
    }

    /// Read `bytes` of an f32 tensor from byte `offset` (a multiple of 4) back as values (waits for
    /// the GPU): one gradient bucket of an arena.
    pub fn read_range(&self, ctx: &Context, t: TensorId, offset: u64, bytes: u64) -> Result<Vec<f32>> {
        let info = &self.tensors[t.0];
        if info.role == Role::Intermediate && !info.output {
            bail!("tensor '{}' is an intermediate whose buffer is reused; mark it as output to read it", info.name);
        }
        if !offset.is_multiple_of(4) || !bytes.is_multiple_of(4) || offset + bytes > info.bytes() {
            bail!(
                "bytes {offset}..{} are not whole words of tensor '{}' ({} bytes)",
                offset + bytes,
                info.name,
                info.bytes()
            );
        }
        let src = &self.buffers[self.memory.slot_of(t)];
        let words = ctx.read_buffer_range(src, info.view.map_or(0, |v| v.offset) + offset, bytes)?;
        Ok(words.into_iter().map(f32::from_bits).collect())
    }

    /// Overwrite f32 values of tensor `t` from byte `offset` (any role: the data-parallel trainer
    /// writes the averaged gradients back into the gradient arena between two segments of a step).
    pub fn write_range(&self, ctx: &Context, t: TensorId, offset: u64, data: &[f32]) -> Result<()> {
        let info = &self.tensors[t.0];
        let bytes = 4 * data.len() as u64;
        if !offset.is_multiple_of(4) || offset + bytes > info.bytes() {
            bail!(
                "bytes {offset}..{} are not whole words of tensor '{}' ({} bytes)",
                offset + bytes,
                info.name,
                info.bytes()
            );
        }
        let dst = &self.buffers[self.memory.slot_of(t)];
        ctx.queue.write_buffer(dst, info.view.map_or(0, |v| v.offset) + offset, bytemuck::cast_slice(data));
        Ok(())
    }

    /// Read a tensor back as f32 values (waits for the GPU): spikes unpacked to 0.0 / 1.0, other
    /// dtypes' words reinterpreted.
    pub fn read(&self, ctx: &Context, t: TensorId) -> Result<Vec<f32>> {
        let words = self.read_u32(ctx, t)?;
        let info = &self.tensors[t.0];
        Ok(match info.dtype {
            DType::Spike => unpack_spikes(&words, info.numel()),
            DType::F32 | DType::U32 => words.into_iter().map(f32::from_bits).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_windows_never_overlap_and_stay_aligned() {
        for align in [16u64, 32, 64, 256] {
            let offs = param_offsets(5, align);
            assert_eq!(offs[0], 0);
            for w in offs.windows(2) {
                assert!(w[1] - w[0] >= PARAMS_WINDOW, "align {align}: windows at {w:?} overlap");
                assert_eq!(w[1] % align, 0, "align {align}: offset {} unaligned", w[1]);
            }
        }
    }
}

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

use super::{plan_memory, Graph, MemoryPlan, Role, TensorId, TensorInfo};
use crate::gpu::Context;

const DISPATCHES_PER_SUBMIT: usize = 256;
/// Every node's uniform binding is this wide (its words, zero-padded), so a shader's Params struct
/// may be longer than what a particular entry point's node fills in.
const PARAMS_WINDOW: u64 = 4 * super::MAX_PARAM_WORDS as u64;
const MAX_IN_FLIGHT: usize = 3;

struct CompiledNode {
    pipeline: Arc<wgpu::ComputePipeline>,
    bind_group: wgpu::BindGroup,
    workgroups: [u32; 3],
    params_offset: u64,
}

/// What one run did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunStats {
    pub dispatches: usize,
    pub submits: usize,
}

/// A compiled graph: buffers, pipelines and bind groups, ready to replay.
pub struct Plan {
    tensors: Vec<TensorInfo>,
    memory: MemoryPlan,
    buffers: Vec<wgpu::Buffer>,
    params: wgpu::Buffer,
    nodes: Vec<CompiledNode>,
    staging: HashMap<TensorId, wgpu::Buffer>,
}

impl Plan {
    pub fn compile(ctx: &Context, g: &Graph) -> Result<Plan> {
        let memory = plan_memory(g);
        let max_binding = ctx.max_binding_bytes();
        for t in &g.tensors {
            if t.bytes() > max_binding {
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
        }
        let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
        let buffers = memory
            .slot_bytes
            .iter()
            .enumerate()
            .map(|(i, &bytes)| ctx.create_buffer(&format!("slot{i}"), bytes, usage))
            .collect::<Result<Vec<_>>>()?;

        let align = ctx.limits.min_uniform_buffer_offset_alignment as u64;
        let mut offsets = Vec::with_capacity(g.nodes.len());
        let mut words: Vec<u32> = Vec::new();
        for node in &g.nodes {
            let start = (words.len() as u64 * 4).div_ceil(align) * align;
            words.resize((start / 4) as usize, 0);
            offsets.push(start);
            words.extend_from_slice(&node.params);
        }
        let params = ctx.create_buffer(
            "node params",
            offsets.last().map_or(0, |o| o + PARAMS_WINDOW).max(PARAMS_WINDOW),
            wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        )?;
        if !words.is_empty() {
            ctx.queue.write_buffer(&params, 0, bytemuck::cast_slice(&words));
        }

        let mut nodes = Vec::with_capacity(g.nodes.len());
        for (node, &params_offset) in g.nodes.iter().zip(&offsets) {
            let pipeline = ctx.pipeline(node.shader, node.entry)?;
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
                entries.push(wgpu::BindGroupEntry {
                    binding: k as u32 + 1,
                    resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                        buffer: &buffers[memory.slot_of(*t)],
                        offset: 0,
                        size: std::num::NonZeroU64::new(g.tensors[t.0].bytes()),
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
        Ok(Plan { tensors: g.tensors.clone(), memory, buffers, params, nodes, staging })
    }

    pub fn memory(&self) -> &MemoryPlan {
        &self.memory
    }

    /// Upload the data of an input or param tensor (f32 or raw 32-bit words).
    pub fn write<T: bytemuck::Pod>(&self, ctx: &Context, t: TensorId, data: &[T]) -> Result<()> {
        let info = &self.tensors[t.0];
        if info.role == Role::Intermediate {
            bail!("tensor '{}' is an intermediate; only inputs and params can be written", info.name);
        }
        let bytes: &[u8] = bytemuck::cast_slice(data);
        if bytes.len() as u64 != info.bytes() {
            bail!("tensor '{}' {:?} holds {} values, got {}", info.name, info.shape, info.numel(), bytes.len() / 4);
        }
        ctx.queue.write_buffer(&self.buffers[self.memory.slot_of(t)], 0, bytes);
        Ok(())
    }

    /// Replace one node's uniform parameters (same length) before the next run.
    pub fn set_params(&self, ctx: &Context, node: usize, params: &[u32]) {
        ctx.queue.write_buffer(&self.params, self.nodes[node].params_offset, bytemuck::cast_slice(params));
    }

    /// Record and submit every dispatch; returns without waiting for the last submission.
    pub fn run(&self, ctx: &Context) -> Result<RunStats> {
        self.run_repeated(ctx, 1, &mut |_| {})
    }

    /// Replay the whole node list `reps` times back to back (the sampling loop: GPU-side state
    /// such as a step counter advances between replays). Dispatches are packed into command
    /// buffers of at most `DISPATCHES_PER_SUBMIT` (whole replays share one when they fit), one
    /// compute pass per replay chunk; `progress(replays_submitted)` is called after each submit.
    /// Returns without waiting for the last submission.
    pub fn run_repeated(&self, ctx: &Context, reps: usize, progress: &mut dyn FnMut(usize)) -> Result<RunStats> {
        let mut stats = RunStats::default();
        let mut in_flight: VecDeque<wgpu::SubmissionIndex> = VecDeque::new();
        ctx.scoped("running a compiled graph", || -> Result<()> {
            let mut enc = ctx.device.create_command_encoder(&Default::default());
            let mut pending = 0usize;
            let mut submit = |enc: wgpu::CommandEncoder, stats: &mut RunStats| -> Result<()> {
                in_flight.push_back(ctx.queue.submit([enc.finish()]));
                stats.submits += 1;
                if in_flight.len() > MAX_IN_FLIGHT {
                    ctx.wait_for(in_flight.pop_front().unwrap())?;
                }
                Ok(())
            };
            for rep in 0..reps {
                for chunk in self.nodes.chunks(DISPATCHES_PER_SUBMIT) {
                    if pending > 0 && pending + chunk.len() > DISPATCHES_PER_SUBMIT {
                        let full = std::mem::replace(&mut enc, ctx.device.create_command_encoder(&Default::default()));
                        submit(full, &mut stats)?;
                        progress(rep);
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
                submit(enc, &mut stats)?;
            }
            progress(reps);
            Ok(())
        })??;
        Ok(stats)
    }

    /// Read a tensor back as raw 32-bit words (waits for the GPU).
    pub fn read_u32(&self, ctx: &Context, t: TensorId) -> Result<Vec<u32>> {
        let info = &self.tensors[t.0];
        if info.role == Role::Intermediate && !info.output {
            bail!("tensor '{}' is an intermediate whose buffer is reused; mark it as output to read it", info.name);
        }
        let src = &self.buffers[self.memory.slot_of(t)];
        match self.staging.get(&t) {
            Some(staging) => ctx.read_via(src, staging, info.bytes()),
            None => ctx.read_buffer(src, info.bytes()),
        }
    }

    /// Read a tensor back as f32 (waits for the GPU).
    pub fn read(&self, ctx: &Context, t: TensorId) -> Result<Vec<f32>> {
        Ok(self.read_u32(ctx, t)?.into_iter().map(f32::from_bits).collect())
    }
}

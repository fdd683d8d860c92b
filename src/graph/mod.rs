//! The static command graph: tensors with fixed shapes, nodes that are kernel dispatches.
//!
//! Ops (src/ops/) append nodes; [`Plan::compile`] assigns every tensor a GPU buffer (intermediates
//! share buffers by liveness), creates pipelines and bind groups once, and [`Plan::run`] replays the
//! dispatches as often as needed with new input data.
//!
//! Element types: every tensor has a [`DType`] (F32 unless built with [`Graph::input_as`],
//! [`Graph::param_as`] or [`Graph::intermediate_as`]); its bytes, buffer sizes, uploads and
//! readbacks follow it. Like candle's quantized formats, a type is a block of elements stored in
//! a whole number of bytes: `Spike` packs 32 spikes (0 or 1) into one u32 word, element `i` of
//! the flat tensor at bit `i % 32` of word `i / 32`. A kernel declares what each binding holds:
//! [`Graph::push`] means "all F32", [`Graph::push_typed`] lists the dtype of every read and write.
//! A tensor of another dtype is a graph-building error naming the node and the tensor.
//!
//! Graph building does not panic on sizes that come from the user: a tensor too large for 32-bit
//! kernel indices, a dispatch wider than 65535 workgroups or a dtype mismatch is recorded, building goes on, and [`Graph::check`] (also
//! run by [`Plan::compile`]) returns the first such error. Callers add which flag to change.
//!
//! Design (liveness memory plan, arenas, fixed-order reductions, bit-packed spikes, fusions):
//! docs/graph.md.

mod arena;
mod autodiff;
mod exec;
mod planner;

pub use arena::{split_members, Layout, View, ARENA_ALIGN, ARENA_CHUNK, ARENA_MAX_BYTES};
pub use autodiff::{backward, Accumulate, BackwardFn, BackwardIntoFn, Rule, TapeEntry};
pub use exec::{NodeInfo, NodeTimes, Plan, RunStats, Timing};
pub use planner::{plan_memory, MemoryPlan};

use anyhow::{bail, Result};

use crate::gpu::Shader;

/// Most 32-bit words a node's uniform parameters may have.
pub const MAX_PARAM_WORDS: usize = 16;

/// Index of a tensor in its [`Graph`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TensorId(pub usize);

/// How a tensor's storage lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Written by the host before each run.
    Input,
    /// Weights and other state that persist across runs (may be updated in place by kernels).
    Param,
    /// Produced and consumed inside one run; shares buffers with others by liveness.
    Intermediate,
}

/// Element type of a tensor's storage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum DType {
    #[default]
    F32,
    /// Indices and counters (timesteps, the sampler's step).
    U32,
    /// Spikes (0 or 1), bit-packed 32 per u32 word: element i at bit i % 32 of word i / 32.
    Spike,
}

impl DType {
    /// Elements per storage block.
    pub fn block_size(self) -> usize {
        match self {
            DType::F32 | DType::U32 => 1,
            DType::Spike => 32,
        }
    }

    /// Bytes of one block.
    pub fn block_bytes(self) -> u64 {
        4
    }

    /// Storage bytes of `numel` elements: whole blocks, rounded up to the 4-byte multiple a
    /// storage binding needs.
    pub fn bytes(self, numel: usize) -> u64 {
        (numel.div_ceil(self.block_size()) as u64 * self.block_bytes()).div_ceil(4) * 4
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::U32 => "u32",
            DType::Spike => "spike (1 bit)",
        }
    }
}

/// Packs 0/1 values into [`DType::Spike`] words (any nonzero value is a spike).
pub fn pack_spikes(values: &[f32]) -> Vec<u32> {
    let mut words = vec![0u32; values.len().div_ceil(32)];
    for (i, &v) in values.iter().enumerate() {
        if v != 0.0 {
            words[i / 32] |= 1 << (i % 32);
        }
    }
    words
}

/// The `numel` 0.0/1.0 values of [`DType::Spike`] words.
pub fn unpack_spikes(words: &[u32], numel: usize) -> Vec<f32> {
    (0..numel).map(|i| ((words[i / 32] >> (i % 32)) & 1) as f32).collect()
}

#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    pub shape: Vec<usize>,
    pub role: Role,
    pub dtype: DType,
    /// Read back by the host after a run: kept alive to the end and given a staging buffer.
    pub output: bool,
    /// Set when the tensor lives inside an arena's buffer (see [`Graph::arena`]).
    pub view: Option<View>,
    /// Words uploaded when the plan is compiled (tables: see [`Graph::constant_u32`]).
    pub init: Option<std::sync::Arc<[u32]>>,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn bytes(&self) -> u64 {
        self.dtype.bytes(self.numel())
    }
}

/// Most elements a tensor may have: kernels index with u32.
pub const MAX_ELEMENTS: usize = u32::MAX as usize;

/// Most workgroups of one dispatch along one axis (WebGPU's guaranteed limit).
pub const MAX_WORKGROUPS: u32 = 65535;

/// Work a node does, for benchmarks and the profiler.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cost {
    pub flops: u64,
    /// Bytes the kernel must move at least (each input read once, each output written once).
    pub bytes: u64,
}

/// Per-channel partial sums of a tensor x [N, C, ...] (N = T*B: T spiking steps of B images) that
/// the kernel producing x wrote as a by-product, so that a channel reduction of x
/// (`ops::reduce::group_sum`) only has to add them: `part[(r * C + c) * slices + q]` is the sum
/// of slice q of the values of channel c in row r, where the rows cut every step's B images into
/// `rows` blocks of consecutive images (image b of a step is in row b / (B / rows)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartialSums {
    pub part: TensorId,
    pub rows: usize,
    pub slices: usize,
    /// Each row is one image (rows = B): then the sums serve any grouping of the images.
    pub per_image: bool,
}

/// One kernel dispatch. Binding 0 is the uniform `params`; then `reads` (read-only storage) in
/// order, then `writes` (read_write storage) in order.
#[derive(Debug, Clone)]
pub struct Node {
    pub shader: &'static Shader,
    pub entry: &'static str,
    pub params: Vec<u32>,
    pub reads: Vec<TensorId>,
    pub writes: Vec<TensorId>,
    pub workgroups: [u32; 3],
    /// Which op (and later which model layer) this dispatch belongs to.
    pub label: String,
    pub cost: Cost,
}

/// One kernel an op family offers for a node: same bindings and parameters as the others, its
/// own entry point, WGSL `override` constants (tile and workgroup sizes) and grid.
#[derive(Debug, Clone, PartialEq)]
pub struct Variant {
    /// Unique within the family, e.g. "wg16x16"; recorded in caches and run folders.
    pub name: String,
    pub entry: &'static str,
    pub constants: Vec<(&'static str, f64)>,
    pub workgroups: [u32; 3],
    /// The kernel writes all the workgroup memory it reads before reading it, so the pipeline
    /// may skip the zero-initialisation WebGPU otherwise requires (a pass over it per workgroup).
    pub writes_workgroup_memory_first: bool,
    /// The module holding `entry` when it is not the node's (kernels that need a device feature
    /// live in a module of their own: a module that uses a feature fails to compile without it).
    pub shader: Option<&'static Shader>,
    /// What the adapter must offer for this variant to be a candidate (crate::tune drops the
    /// candidates it cannot run).
    pub needs: Needs,
    /// The outputs its tiles compute, for kernels that compute whole tiles (None: every output
    /// computed is one the node needs). Read by the GPU model (crate::gpu_model).
    pub tile: Option<TileWork>,
}

/// The output work of a tiled kernel: it computes `computed_outputs` values (every lane of every
/// tile it launches, in or out of bounds: a lane past the edge idles while its warp works), of
/// which `useful_outputs` are the node's. Each output costs the same reduction, so the share of
/// the dispatch's FMA issue slots that do useful work is their ratio.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TileWork {
    pub useful_outputs: u64,
    pub computed_outputs: u64,
}

impl TileWork {
    /// Useful outputs / computed outputs (1.0 when nothing is computed).
    pub fn utilization(&self) -> f64 {
        if self.computed_outputs == 0 {
            1.0
        } else {
            self.useful_outputs as f64 / self.computed_outputs as f64
        }
    }

    /// The work of a grid whose `workgroups` each compute `per_workgroup` outputs.
    pub fn of_grid(useful_outputs: usize, workgroups: [u32; 3], per_workgroup: usize) -> Self {
        let groups: u64 = workgroups.iter().map(|&w| w as u64).product();
        TileWork { useful_outputs: useful_outputs as u64, computed_outputs: groups * per_workgroup as u64 }
    }
}

/// A check that a variant computes what the family's default does on this adapter, on a small
/// problem of the family's choosing (see [`Needs::check`]).
#[derive(Debug, Clone, Copy)]
pub struct SelfCheck(pub fn(&crate::gpu::Context, &Variant) -> Result<CheckOutcome>);

impl PartialEq for SelfCheck {
    fn eq(&self, other: &Self) -> bool {
        // Variants compare equal when they would run the same check; an address is all a
        // function pointer offers to compare.
        std::ptr::fn_addr_eq(self.0, other.0)
    }
}

impl Eq for SelfCheck {}

/// What a [`SelfCheck`] measured: the variant passes if `error` is finite and at most `limit`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CheckOutcome {
    /// Relative L2 error against the family's default kernel.
    pub error: f64,
    pub limit: f64,
}

impl CheckOutcome {
    pub fn passed(&self) -> bool {
        self.error <= self.limit
    }
}

/// Device capabilities a [`Variant`] needs beyond WebGPU's guaranteed minimum.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Needs {
    pub features: wgpu::Features,
    /// Workgroup memory of one workgroup (the limit is `max_compute_workgroup_storage_size`).
    pub workgroup_bytes: u32,
    /// Invocations per workgroup (the limit is `max_compute_invocations_per_workgroup`).
    pub invocations: u32,
    /// Side F of the F x F x F f16 x f16 -> f32 cooperative-matrix configuration the variant
    /// multiplies with (0: none). The adapter must list it (`Context::coop_sizes`): a driver
    /// asked for a shape it does not list may run it and return garbage without an error.
    pub coop: u32,
    /// Subgroup widths (lowest, highest) the variant computes correctly for: the adapter's whole
    /// reported range must lie inside (None: any). The cooperative-matrix kernels hand their
    /// tile's fragments to subgroups in a fixed number of slots.
    pub subgroups: Option<(u32, u32)>,
    /// A check the variant must pass on an adapter before it may serve there (crate::tune runs
    /// it once per adapter and kernel, caches the verdict with the tuning results, and drops a
    /// variant that fails with a one-line notice). Cooperative-matrix variants have one: a
    /// driver can accept a shape and compute zeros.
    pub check: Option<SelfCheck>,
}

impl Needs {
    /// Whether a device with `features` and `limits` can run the variant (the cooperative-matrix
    /// shape aside: see [`Needs::met_on`]).
    pub fn met_by(&self, features: wgpu::Features, limits: &wgpu::Limits) -> bool {
        features.contains(self.features)
            && self.workgroup_bytes <= limits.max_compute_workgroup_storage_size
            && self.invocations <= limits.max_compute_invocations_per_workgroup
    }

    /// Whether `ctx`'s device can run the variant: [`Needs::met_by`], its cooperative-matrix
    /// shape, if any, among those the device has, and the adapter's subgroup widths.
    pub fn met_on(&self, ctx: &crate::gpu::Context) -> bool {
        let (lo, hi) = ctx.adapter.subgroup_sizes;
        self.met_by(ctx.features, &ctx.limits)
            && (self.coop == 0 || ctx.coop_sizes.contains(&self.coop))
            && self.subgroups.is_none_or(|(min, max)| min <= lo && hi <= max)
    }
}

/// The candidates of a node whose kernel is chosen at compile time (index 0 is the default).
#[derive(Debug, Clone, PartialEq)]
pub struct Tunable {
    pub candidates: Vec<Variant>,
    pub chosen: usize,
    /// The node's own module (candidates without [`Variant::shader`] use it).
    pub shader: &'static Shader,
}

impl Tunable {
    pub fn variant(&self) -> &Variant {
        &self.candidates[self.chosen]
    }
}

#[derive(Debug, Default, Clone)]
pub struct Graph {
    pub tensors: Vec<TensorInfo>,
    pub nodes: Vec<Node>,
    /// Differentiable ops in forward order, for [`backward`].
    pub tape: Vec<TapeEntry>,
    /// Nodes with several candidate kernels, by node index (see crate::tune).
    pub variants: std::collections::BTreeMap<usize, Tunable>,
    /// Channel sums of tensors that the kernels producing them wrote on the side, by tensor.
    pub partial_sums: std::collections::BTreeMap<TensorId, PartialSums>,
    /// The first building error (see the module comment); [`Graph::check`] returns it.
    error: Option<String>,
    /// Tensors made by [`Graph::arena`].
    arenas: std::collections::BTreeSet<TensorId>,
}

impl Graph {
    pub fn new() -> Self {
        Self::default()
    }

    fn fail(&mut self, msg: String) {
        self.error.get_or_insert(msg);
    }

    /// The first error recorded while building (tensor too large, dtype mismatch), if any.
    pub fn check(&self) -> Result<()> {
        match self.error.clone().or_else(|| self.arena_conflict()) {
            Some(e) => bail!("{e}"),
            None => Ok(()),
        }
    }

    fn add(&mut self, name: String, shape: &[usize], role: Role, dtype: DType) -> TensorId {
        assert!(shape.iter().all(|&d| d > 0), "tensor '{name}' has an empty dimension: {shape:?}");
        let numel = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        if numel.is_none_or(|n| n > MAX_ELEMENTS) {
            let n = shape.iter().map(|&d| d as u128).product::<u128>();
            self.fail(format!(
                "tensor '{name}' {shape:?} has {n} elements, more than the {MAX_ELEMENTS} a kernel can index"
            ));
        }
        self.tensors.push(TensorInfo {
            name,
            shape: shape.to_vec(),
            role,
            dtype,
            output: false,
            view: None,
            init: None,
        });
        TensorId(self.tensors.len() - 1)
    }

    pub fn input(&mut self, name: &str, shape: &[usize]) -> TensorId {
        self.add(name.to_string(), shape, Role::Input, DType::F32)
    }

    pub fn input_as(&mut self, name: &str, shape: &[usize], dtype: DType) -> TensorId {
        self.add(name.to_string(), shape, Role::Input, dtype)
    }

    pub fn param(&mut self, name: &str, shape: &[usize]) -> TensorId {
        self.add(name.to_string(), shape, Role::Param, DType::F32)
    }

    pub fn param_as(&mut self, name: &str, shape: &[usize], dtype: DType) -> TensorId {
        self.add(name.to_string(), shape, Role::Param, dtype)
    }

    /// A fresh intermediate; `name` says which op made it (for error messages and reports).
    pub fn intermediate(&mut self, name: &str, shape: &[usize]) -> TensorId {
        self.add(name.to_string(), shape, Role::Intermediate, DType::F32)
    }

    pub fn intermediate_as(&mut self, name: &str, shape: &[usize], dtype: DType) -> TensorId {
        self.add(name.to_string(), shape, Role::Intermediate, dtype)
    }

    pub fn dtype(&self, t: TensorId) -> DType {
        self.tensors[t.0].dtype
    }

    /// Give `t` a new shape with the same number of elements (a view: no data moves).
    pub fn reshape(&mut self, t: TensorId, shape: &[usize]) {
        let info = &self.tensors[t.0];
        assert_eq!(
            shape.iter().product::<usize>(),
            info.numel(),
            "cannot reshape '{}' {:?} to {shape:?}",
            info.name,
            info.shape
        );
        self.tensors[t.0].shape = shape.to_vec();
    }

    /// Storage bytes of `t` (for node costs).
    pub fn bytes_of(&self, t: TensorId) -> u64 {
        self.tensors[t.0].bytes()
    }

    /// Mark a tensor as read back by the host after each run.
    pub fn mark_output(&mut self, t: TensorId) {
        self.tensors[t.0].output = true;
    }

    pub fn info(&self, t: TensorId) -> &TensorInfo {
        &self.tensors[t.0]
    }

    pub fn shape(&self, t: TensorId) -> &[usize] {
        &self.tensors[t.0].shape
    }

    /// Append a kernel whose bindings are all F32.
    pub fn push(&mut self, node: Node) {
        let (r, w) = (vec![DType::F32; node.reads.len()], vec![DType::F32; node.writes.len()]);
        self.push_typed(node, &r, &w);
    }

    /// Append a kernel that reads bindings of dtypes `reads` and writes `writes` (in binding
    /// order). A tensor of another dtype is recorded as an error naming the node and tensor.
    pub fn push_typed(&mut self, node: Node, reads: &[DType], writes: &[DType]) {
        assert!(
            reads.len() == node.reads.len() && writes.len() == node.writes.len(),
            "node '{}' ({}::{}) declares {} reads and {} writes but binds {} and {}",
            node.label,
            node.shader.name,
            node.entry,
            reads.len(),
            writes.len(),
            node.reads.len(),
            node.writes.len()
        );
        if let Some(&big) = node.workgroups.iter().find(|&&w| w > MAX_WORKGROUPS) {
            let msg = format!(
                "node '{}' ({}::{}) needs {big} workgroups along one axis, more than the {MAX_WORKGROUPS} an adapter must allow",
                node.label, node.shader.name, node.entry
            );
            self.fail(msg);
        }
        let bound = node.reads.iter().zip(reads).chain(node.writes.iter().zip(writes));
        for (&t, &want) in bound {
            let info = &self.tensors[t.0];
            if info.dtype != want {
                let msg = format!(
                    "node '{}' ({}::{}) expects {} but tensor '{}' {:?} is {}",
                    node.label,
                    node.shader.name,
                    node.entry,
                    want.name(),
                    info.name,
                    info.shape,
                    info.dtype.name()
                );
                self.fail(msg);
            }
        }
        assert!(
            node.params.len() <= MAX_PARAM_WORDS,
            "node '{}' has {} parameter words; at most {MAX_PARAM_WORDS} fit the uniform window",
            node.label,
            node.params.len()
        );
        for &w in &node.writes {
            assert!(
                !node.reads.contains(&w),
                "node '{}' reads and writes tensor '{}': declare it only in writes",
                node.label,
                self.tensors[w.0].name
            );
        }
        self.nodes.push(node);
    }
}

impl Graph {
    /// Push a node whose kernel is one of `candidates` (index 0, the default, until chosen
    /// otherwise); `node.entry` and `node.workgroups` are taken from the chosen candidate.
    pub fn push_variants(&mut self, node: Node, candidates: Vec<Variant>) {
        let (r, w) = (vec![DType::F32; node.reads.len()], vec![DType::F32; node.writes.len()]);
        self.push_variants_typed(node, &r, &w, candidates);
    }

    /// [`Graph::push_variants`] for a node whose bindings have the dtypes `reads` and `writes`
    /// (see [`Graph::push_typed`]); every candidate reads and writes the same dtypes.
    pub fn push_variants_typed(&mut self, mut node: Node, reads: &[DType], writes: &[DType], candidates: Vec<Variant>) {
        assert!(!candidates.is_empty(), "node '{}' offers no kernel variant", node.label);
        let shader = node.shader;
        node.shader = candidates[0].shader.unwrap_or(shader);
        node.entry = candidates[0].entry;
        node.workgroups = candidates[0].workgroups;
        self.push_typed(node, reads, writes);
        self.variants.insert(self.nodes.len() - 1, Tunable { candidates, chosen: 0, shader });
    }

    /// Keep only the candidates `keep` accepts (the default, index 0, always stays: it is what
    /// runs untuned on every adapter), and go back to the default on every tunable node.
    pub fn retain_candidates(&mut self, keep: impl Fn(&Variant) -> bool) {
        let nodes: Vec<usize> = self.variants.keys().copied().collect();
        for node in nodes {
            let t = self.variants.get_mut(&node).expect("a tunable node");
            let mut i = 0;
            t.candidates.retain(|v| {
                i += 1;
                i == 1 || keep(v)
            });
            self.choose(node, 0);
        }
    }

    /// Use candidate `index` for tunable node `node`.
    pub fn choose(&mut self, node: usize, index: usize) {
        let t = self.variants.get_mut(&node).expect("choose() on a node without variants");
        t.chosen = index;
        let v = &t.candidates[index];
        self.nodes[node].shader = v.shader.unwrap_or(t.shader);
        self.nodes[node].entry = v.entry;
        self.nodes[node].workgroups = v.workgroups;
    }

    /// What a tuning result is valid for: the family, its default entry, the shapes bound and the
    /// parameters (sizes, strides, flags). Nodes with equal keys share one measurement.
    pub fn tuning_key(&self, node: usize) -> String {
        let n = &self.nodes[node];
        let shapes = |ts: &[TensorId]| ts.iter().map(|t| format!("{:?}", self.shape(*t))).collect::<Vec<_>>().join(",");
        let (shader, default) =
            self.variants.get(&node).map_or((n.shader, n.entry), |t| (t.shader, t.candidates[0].entry));
        format!("{}::{} in {} out {} p {:?}", shader.name, default, shapes(&n.reads), shapes(&n.writes), n.params)
    }

    /// Record a differentiable op (see [`backward`]).
    pub fn record(
        &mut self,
        label: &str,
        inputs: Vec<TensorId>,
        outputs: Vec<TensorId>,
        backward: impl Fn(&mut Graph, &[Option<TensorId>], &[bool]) -> Vec<Option<TensorId>> + Send + Sync + 'static,
    ) {
        self.tape.push(TapeEntry {
            label: label.to_string(),
            inputs,
            outputs,
            backward: Rule::Plain(std::sync::Arc::new(backward)),
        });
    }

    /// Record a differentiable op whose backward adds its input gradients to those the inputs
    /// already received (see [`BackwardIntoFn`]); `inputs` must be distinct.
    pub fn record_into(
        &mut self,
        label: &str,
        inputs: Vec<TensorId>,
        outputs: Vec<TensorId>,
        backward: impl Fn(&mut Graph, &[Option<TensorId>], &[bool], &[Option<TensorId>]) -> Vec<Option<TensorId>>
            + Send
            + Sync
            + 'static,
    ) {
        let distinct: std::collections::BTreeSet<_> = inputs.iter().collect();
        assert_eq!(distinct.len(), inputs.len(), "'{label}': record_into needs distinct inputs");
        self.tape.push(TapeEntry {
            label: label.to_string(),
            inputs,
            outputs,
            backward: Rule::Into(std::sync::Arc::new(backward)),
        });
    }
}

/// Workgroup counts for `n` invocations of a 1-D kernel with workgroup size `wg`, spread over x
/// and y so no dimension exceeds the 65535 limit. Shaders recover the flat index as
/// `(wid.y * num_workgroups.x + wid.x) * wg + lid.x` and must bounds-check it.
pub fn grid_1d(n: usize, wg: usize) -> [u32; 3] {
    let groups = n.div_ceil(wg).max(1);
    let x = groups.min(32768);
    [x as u32, groups.div_ceil(x) as u32, 1]
}

/// A size or count as a u32 kernel parameter. Sizes past u32 saturate: graph building has then
/// already recorded a tensor too large to index (see [`Graph::check`]), so the node never runs.
pub fn size_u32(v: usize) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

/// The uniform words of a node.
///
/// Every op passes a `#[repr(C)]` Pod parameter struct that mirrors its shader's WGSL struct
/// member for member (tests/shaders.rs checks each layout against naga's reflection).
pub struct Params;

impl Params {
    /// The words of parameter struct `p`, padded to 16 bytes.
    pub fn of<P: bytemuck::Pod>(p: &P) -> Vec<u32> {
        let mut words: Vec<u32> = bytemuck::cast_slice(std::slice::from_ref(p)).to_vec();
        words.resize(words.len().div_ceil(4).max(1) * 4, 0);
        words
    }
}

//! The static command graph: tensors with fixed shapes, nodes that are kernel dispatches.
//!
//! Ops (src/ops/) append nodes; [`Plan::compile`] assigns every tensor a GPU buffer (intermediates
//! share buffers by liveness), creates pipelines and bind groups once, and [`Plan::run`] replays the
//! dispatches as often as needed with new input data. Every element is 32 bits (f32, or u32 for
//! indices); shaders decide how to read them.

mod autodiff;
mod exec;
mod planner;

pub use autodiff::{backward, BackwardFn, TapeEntry};
pub use exec::{NodeInfo, NodeTimes, Plan, RunStats, Timing};
pub use planner::{plan_memory, MemoryPlan};

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

#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    pub shape: Vec<usize>,
    pub role: Role,
    /// Read back by the host after a run: kept alive to the end and given a staging buffer.
    pub output: bool,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn bytes(&self) -> u64 {
        4 * self.numel() as u64
    }
}

/// Work a node does, for benchmarks and the profiler.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cost {
    pub flops: u64,
    /// Bytes the kernel must move at least (each input read once, each output written once).
    pub bytes: u64,
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
}

/// The candidates of a node whose kernel is chosen at compile time (index 0 is the default).
#[derive(Debug, Clone, PartialEq)]
pub struct Tunable {
    pub candidates: Vec<Variant>,
    pub chosen: usize,
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
}

impl Graph {
    pub fn new() -> Self {
        Self::default()
    }

    fn add(&mut self, name: String, shape: &[usize], role: Role) -> TensorId {
        assert!(shape.iter().all(|&d| d > 0), "tensor '{name}' has an empty dimension: {shape:?}");
        self.tensors.push(TensorInfo { name, shape: shape.to_vec(), role, output: false });
        TensorId(self.tensors.len() - 1)
    }

    pub fn input(&mut self, name: &str, shape: &[usize]) -> TensorId {
        self.add(name.to_string(), shape, Role::Input)
    }

    pub fn param(&mut self, name: &str, shape: &[usize]) -> TensorId {
        self.add(name.to_string(), shape, Role::Param)
    }

    /// A fresh intermediate; `name` says which op made it (for error messages and reports).
    pub fn intermediate(&mut self, name: &str, shape: &[usize]) -> TensorId {
        self.add(name.to_string(), shape, Role::Intermediate)
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

    pub fn push(&mut self, node: Node) {
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
    pub fn push_variants(&mut self, mut node: Node, candidates: Vec<Variant>) {
        assert!(!candidates.is_empty(), "node '{}' offers no kernel variant", node.label);
        node.entry = candidates[0].entry;
        node.workgroups = candidates[0].workgroups;
        self.push(node);
        self.variants.insert(self.nodes.len() - 1, Tunable { candidates, chosen: 0 });
    }

    /// Use candidate `index` for tunable node `node`.
    pub fn choose(&mut self, node: usize, index: usize) {
        let t = self.variants.get_mut(&node).expect("choose() on a node without variants");
        t.chosen = index;
        let v = &t.candidates[index];
        self.nodes[node].entry = v.entry;
        self.nodes[node].workgroups = v.workgroups;
    }

    /// What a tuning result is valid for: the family, its default entry, the shapes bound and the
    /// parameters (sizes, strides, flags). Nodes with equal keys share one measurement.
    pub fn tuning_key(&self, node: usize) -> String {
        let n = &self.nodes[node];
        let shapes = |ts: &[TensorId]| ts.iter().map(|t| format!("{:?}", self.shape(*t))).collect::<Vec<_>>().join(",");
        let default = self.variants.get(&node).map_or(n.entry, |t| t.candidates[0].entry);
        format!("{}::{} in {} out {} p {:?}", n.shader.name, default, shapes(&n.reads), shapes(&n.writes), n.params)
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
            backward: std::sync::Arc::new(backward),
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

/// Helper to build the uniform words of a node: u32s and f32s (as bits), padded to 16 bytes.
#[derive(Debug, Default, Clone)]
pub struct Params(pub Vec<u32>);

impl Params {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn u(mut self, v: usize) -> Self {
        self.0.push(u32::try_from(v).expect("kernel parameter exceeds u32"));
        self
    }
    pub fn f(mut self, v: f32) -> Self {
        self.0.push(v.to_bits());
        self
    }
    pub fn build(mut self) -> Vec<u32> {
        while self.0.is_empty() || !self.0.len().is_multiple_of(4) {
            self.0.push(0);
        }
        self.0
    }
}

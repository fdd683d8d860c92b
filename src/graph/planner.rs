//! Liveness-based buffer planning: intermediates whose lifetimes do not overlap share a buffer.
//!
//! A tensor is live from the first node that touches it to the last (outputs to the end); two
//! tensors share a slot only if their lifetimes do not meet, so a node never reads and writes
//! the same buffer. Slots are assigned greedily by size (see [`plan_memory`]). A tensor in an arena
//! shares its arena's slot, and the arena lives from the first use of any member to the last.

use super::{Graph, Role, TensorId};

#[derive(Debug, Clone)]
pub struct MemoryPlan {
    /// Buffer slot of each tensor; `None` for tensors no node uses and that are not inputs/params.
    pub slot: Vec<Option<usize>>,
    /// Size in bytes of each slot.
    pub slot_bytes: Vec<u64>,
    /// Bytes of intermediates if each had its own buffer.
    pub naive_intermediate_bytes: u64,
    /// Bytes of the slots that hold intermediates.
    pub planned_intermediate_bytes: u64,
    /// Bytes of inputs and params (always dedicated).
    pub fixed_bytes: u64,
    /// Bytes of the staging buffers that read outputs back.
    pub staging_bytes: u64,
    /// Bytes of the uniform buffer holding every node's parameters (at the 256-byte offset
    /// alignment WebGPU allows at most; [`super::Plan::compile`] puts the adapter's figure here).
    pub params_bytes: u64,
}

impl MemoryPlan {
    pub fn slot_of(&self, t: TensorId) -> usize {
        self.slot[t.0].expect("tensor has no buffer: it is not used by any node")
    }
    /// Everything the plan allocates on the GPU: intermediates, inputs, parameters and state,
    /// staging, node parameters.
    pub fn total_bytes(&self) -> u64 {
        self.slot_bytes.iter().sum::<u64>() + self.staging_bytes + self.params_bytes
    }
}

pub fn plan_memory(g: &Graph) -> MemoryPlan {
    let n = g.tensors.len();
    // A tensor in an arena has no buffer of its own: its uses are the arena's uses.
    let root = |t: TensorId| g.storage(t).0 .0;
    let mut first = vec![usize::MAX; n];
    let mut last = vec![0usize; n];
    for (i, node) in g.nodes.iter().enumerate() {
        for &t in node.reads.iter().chain(&node.writes) {
            let r = root(t);
            first[r] = first[r].min(i);
            last[r] = last[r].max(i);
        }
    }
    let mut slot = vec![None; n];
    let mut slot_bytes: Vec<u64> = Vec::new();
    let mut fixed_bytes = 0;
    let mut naive = 0;
    for (i, t) in g.tensors.iter().enumerate() {
        if t.output && first[root(TensorId(i))] != usize::MAX {
            last[root(TensorId(i))] = usize::MAX;
        }
    }
    for (i, t) in g.tensors.iter().enumerate() {
        if t.view.is_some() {
            continue;
        }
        if t.role != Role::Intermediate {
            slot[i] = Some(slot_bytes.len());
            slot_bytes.push(t.bytes());
            fixed_bytes += t.bytes();
        } else if first[i] != usize::MAX {
            naive += t.bytes();
        }
    }
    let fixed_slots = slot_bytes.len();

    // Greedy by size (Pisarchyk & Lee, "Efficient memory management for deep neural net
    // inference", 2020, shared objects): largest tensors first, each into the smallest slot
    // whose tensors' lifetimes it does not touch, else a new slot of its size. Slots never grow,
    // so a long-lived small tensor cannot pin a large buffer it was grown into.
    let mut order: Vec<usize> = (0..n)
        .filter(|&i| g.tensors[i].role == Role::Intermediate && g.tensors[i].view.is_none() && first[i] != usize::MAX)
        .collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(g.tensors[i].bytes()), first[i], i));
    let mut lifetimes: Vec<Vec<(usize, usize)>> = Vec::new();
    for i in order {
        let need = g.tensors[i].bytes();
        let (lo, hi) = (first[i], last[i]);
        let fits = |k: usize| lifetimes[k].iter().all(|&(a, b)| b < lo || hi < a);
        let pick = (0..lifetimes.len())
            .filter(|&k| slot_bytes[fixed_slots + k] >= need && fits(k))
            .min_by_key(|&k| (slot_bytes[fixed_slots + k], k));
        let k = pick.unwrap_or_else(|| {
            slot_bytes.push(need);
            lifetimes.push(Vec::new());
            lifetimes.len() - 1
        });
        lifetimes[k].push((lo, hi));
        slot[i] = Some(fixed_slots + k);
    }
    for (i, t) in g.tensors.iter().enumerate() {
        if t.view.is_some() {
            slot[i] = slot[root(TensorId(i))];
        }
    }
    let planned = slot_bytes[fixed_slots..].iter().sum();
    let staging_bytes = g.tensors.iter().filter(|t| t.output).map(|t| t.bytes()).sum();
    MemoryPlan {
        slot,
        slot_bytes,
        naive_intermediate_bytes: naive,
        planned_intermediate_bytes: planned,
        fixed_bytes,
        staging_bytes,
        params_bytes: params_buffer_bytes(&g.nodes, 256),
    }
}

/// Size of the uniform buffer that holds `nodes`' parameters, each bound as a window of
/// [`super::MAX_PARAM_WORDS`] words at offsets stepping by the larger of the window and `align`
/// (windows never overlap; see exec.rs `param_offsets`).
pub fn params_buffer_bytes(nodes: &[super::Node], align: u64) -> u64 {
    let window = 4 * super::MAX_PARAM_WORDS as u64;
    let stride = window.div_ceil(align) * align;
    nodes.len().saturating_sub(1) as u64 * stride + window
}

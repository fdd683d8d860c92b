//! Liveness-based buffer planning: intermediates whose lifetimes do not overlap share a buffer.
//!
//! A tensor is live from the first node that touches it to the last (outputs to the end). Nodes
//! are walked in order; at each node the tensors it starts are given a free slot (best fit,
//! otherwise the largest free slot grown to fit, otherwise a new slot) *before* the tensors it
//! ends are released, so a node never reads and writes the same buffer.

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
    let mut first = vec![usize::MAX; n];
    let mut last = vec![0usize; n];
    for (i, node) in g.nodes.iter().enumerate() {
        for t in node.reads.iter().chain(&node.writes) {
            first[t.0] = first[t.0].min(i);
            last[t.0] = last[t.0].max(i);
        }
    }
    let mut slot = vec![None; n];
    let mut slot_bytes: Vec<u64> = Vec::new();
    let mut fixed_bytes = 0;
    let mut naive = 0;
    for (i, t) in g.tensors.iter().enumerate() {
        if t.role != Role::Intermediate {
            slot[i] = Some(slot_bytes.len());
            slot_bytes.push(t.bytes());
            fixed_bytes += t.bytes();
        } else if first[i] != usize::MAX {
            naive += t.bytes();
            if t.output {
                last[i] = usize::MAX;
            }
        }
    }
    let fixed_slots = slot_bytes.len();

    let mut free: Vec<usize> = Vec::new();
    for (i, node) in g.nodes.iter().enumerate() {
        let mut starting: Vec<TensorId> = Vec::new();
        for &t in node.writes.iter().chain(&node.reads) {
            if g.tensors[t.0].role == Role::Intermediate && first[t.0] == i && !starting.contains(&t) {
                starting.push(t);
            }
        }
        for t in starting {
            let need = g.tensors[t.0].bytes();
            let best_fit = free
                .iter()
                .enumerate()
                .filter(|(_, &s)| slot_bytes[s] >= need)
                .min_by_key(|(_, &s)| slot_bytes[s])
                .map(|(k, _)| k);
            let pick = best_fit.or_else(|| free.iter().enumerate().max_by_key(|(_, &s)| slot_bytes[s]).map(|(k, _)| k));
            let s = match pick {
                Some(k) => free.swap_remove(k),
                None => {
                    slot_bytes.push(0);
                    slot_bytes.len() - 1
                }
            };
            slot_bytes[s] = slot_bytes[s].max(need);
            slot[t.0] = Some(s);
        }
        let mut ending: Vec<usize> = Vec::new();
        for t in node.reads.iter().chain(&node.writes) {
            if g.tensors[t.0].role == Role::Intermediate && last[t.0] == i {
                let s = slot[t.0].unwrap();
                if !ending.contains(&s) {
                    ending.push(s);
                }
            }
        }
        free.extend(ending);
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

/// Size of the uniform buffer that holds `nodes`' parameters at offsets aligned to `align`, each
/// bound as a window of [`super::MAX_PARAM_WORDS`] words.
pub fn params_buffer_bytes(nodes: &[super::Node], align: u64) -> u64 {
    let window = 4 * super::MAX_PARAM_WORDS as u64;
    let mut end = 0u64;
    let mut last = 0u64;
    for node in nodes {
        last = end.div_ceil(align) * align;
        end = last + 4 * node.params.len() as u64;
    }
    if nodes.is_empty() {
        window
    } else {
        last + window
    }
}

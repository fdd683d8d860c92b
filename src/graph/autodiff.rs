//! Reverse-mode differentiation over the command graph.
//!
//! Differentiable ops record a [`TapeEntry`] when they add their forward nodes: which tensors
//! they read and produced, and a rule that appends their backward nodes given the gradients of
//! their outputs. [`backward`] walks the tape in reverse, calls each rule whose outputs received a
//! gradient, and sums gradients reaching a tensor more than once with the caller's `accumulate`
//! (an op such as `ops::elementwise::add`: the graph knows no kernels). The result is more nodes
//! in the same static graph, planned and replayed like the forward.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use super::{Graph, TensorId};

/// Appends backward nodes: given the gradient of each output (None = zero) and which inputs need
/// a gradient, returns the gradient of each input (None where not needed or zero).
pub type BackwardFn = Arc<dyn Fn(&mut Graph, &[Option<TensorId>], &[bool]) -> Vec<Option<TensorId>> + Send + Sync>;

#[derive(Clone)]
pub struct TapeEntry {
    pub label: String,
    pub inputs: Vec<TensorId>,
    pub outputs: Vec<TensorId>,
    pub backward: BackwardFn,
}

impl std::fmt::Debug for TapeEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TapeEntry({}: {:?} -> {:?})", self.label, self.inputs, self.outputs)
    }
}

/// How two gradients of one tensor are summed: `accumulate(g, a, b, name)` appends nodes
/// computing a + b (same shape) and returns the sum.
pub type Accumulate = fn(&mut Graph, TensorId, TensorId, &str) -> TensorId;

/// Append the backward pass of everything recorded so far. `seed` holds dLoss/dLoss (a [1]
/// tensor, normally 1.0); returns the gradient tensor of every tensor in `wrt` that the loss
/// depends on.
pub fn backward(
    g: &mut Graph,
    loss: TensorId,
    seed: TensorId,
    wrt: &[TensorId],
    accumulate: Accumulate,
) -> BTreeMap<TensorId, TensorId> {
    let wrt_set: HashSet<TensorId> = wrt.iter().copied().collect();
    let mut requires: HashSet<TensorId> = wrt_set.clone();
    for e in &g.tape {
        if e.inputs.iter().any(|i| requires.contains(i)) {
            requires.extend(e.outputs.iter().copied());
        }
    }
    let mut grads: BTreeMap<TensorId, TensorId> = BTreeMap::new();
    grads.insert(loss, seed);
    let tape = g.tape.clone();
    for e in tape.iter().rev() {
        let out_grads: Vec<Option<TensorId>> = e.outputs.iter().map(|o| grads.get(o).copied()).collect();
        if out_grads.iter().all(Option::is_none) {
            continue;
        }
        let needs: Vec<bool> = e.inputs.iter().map(|i| requires.contains(i)).collect();
        if !needs.iter().any(|&n| n) {
            continue;
        }
        let in_grads = (e.backward)(g, &out_grads, &needs);
        assert_eq!(in_grads.len(), e.inputs.len(), "backward of '{}' returned a wrong number of gradients", e.label);
        for ((&input, grad), &need) in e.inputs.iter().zip(in_grads).zip(&needs) {
            let Some(grad) = grad else { continue };
            if !need {
                continue;
            }
            let total = match grads.get(&input) {
                None => grad,
                Some(&prev) => accumulate(g, prev, grad, &format!("{}.grad_sum", g.info(input).name)),
            };
            grads.insert(input, total);
        }
    }
    grads.into_iter().filter(|(t, _)| wrt_set.contains(t)).collect()
}

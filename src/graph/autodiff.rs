//! Reverse-mode differentiation over the command graph.
//!
//! Differentiable ops record a [`TapeEntry`] when they add their forward nodes: which tensors
//! they read and produced, and a rule that appends their backward nodes given the gradients of
//! their outputs. [`backward`] walks the tape in reverse, calls each rule whose outputs received a
//! gradient, and sums gradients reaching a tensor more than once with the caller's `accumulate`
//! (an op such as `ops::elementwise::add`: the graph knows no kernels), unless the op recorded
//! with [`Graph::record_into`] adds them itself (one pass over memory less). The result is more
//! nodes in the same static graph, planned and replayed like the forward.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use super::{Graph, TensorId};

/// Appends backward nodes: given the gradient of each output (None = zero) and which inputs need
/// a gradient, returns the gradient of each input (None where not needed or zero).
pub type BackwardFn = Arc<dyn Fn(&mut Graph, &[Option<TensorId>], &[bool]) -> Vec<Option<TensorId>> + Send + Sync>;

/// A [`BackwardFn`] that also receives the gradient each input has received so far (None = none)
/// and returns each input's total: that gradient plus its own, summed as `accumulate` would sum
/// them (earlier + own), inside its own kernels.
pub type BackwardIntoFn =
    Arc<dyn Fn(&mut Graph, &[Option<TensorId>], &[bool], &[Option<TensorId>]) -> Vec<Option<TensorId>> + Send + Sync>;

/// How a tape entry's backward treats gradients its inputs already have.
#[derive(Clone)]
pub enum Rule {
    /// Returns its own contribution; [`backward`] sums.
    Plain(BackwardFn),
    /// Returns the totals (see [`BackwardIntoFn`]).
    Into(BackwardIntoFn),
}

#[derive(Clone)]
pub struct TapeEntry {
    pub label: String,
    pub inputs: Vec<TensorId>,
    pub outputs: Vec<TensorId>,
    pub backward: Rule,
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
        let (in_grads, totals) = match &e.backward {
            Rule::Plain(f) => (f(g, &out_grads, &needs), false),
            Rule::Into(f) => {
                let prev: Vec<Option<TensorId>> = e.inputs.iter().map(|i| grads.get(i).copied()).collect();
                (f(g, &out_grads, &needs, &prev), true)
            }
        };
        assert_eq!(in_grads.len(), e.inputs.len(), "backward of '{}' returned a wrong number of gradients", e.label);
        for ((&input, grad), &need) in e.inputs.iter().zip(in_grads).zip(&needs) {
            let Some(grad) = grad else { continue };
            if !need {
                continue;
            }
            let total = match grads.get(&input) {
                Some(&prev) if !totals => accumulate(g, prev, grad, &format!("{}.grad_sum", g.info(input).name)),
                _ => grad,
            };
            grads.insert(input, total);
        }
    }
    grads.into_iter().filter(|(t, _)| wrt_set.contains(t)).collect()
}

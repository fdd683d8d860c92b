//! Multiply-accumulates of a U-Net, read off its built inference graph rather than a walk of
//! its structure: whatever a builder adds, these counts follow.
//!
//! - A conv or linear node is named by the module whose weight it reads (`{module}.weight`, or
//!   the folded `{module}.weight (+bn)`) and does numel(weight) MACs per output position.
//! - An attention node counts its products: the spiking attention's two (`{attn}.kv` and
//!   `{attn}.qkv`, or `.qk` and `.qkv`: [`spike_attention::node_product`]), the softmax
//!   attention's pair as `{attn}.bmm` ([`attention::node_macs`]).
//! - A node reading spikes (directly or through a layout op of one input, the upsample) is fed
//!   by that spiking layer; the paper's energy estimate charges its MACs at that firing rate.
//!
//! Counts are per row of the node's leading axis: per image and spiking step for the [T*B, ...]
//! activations; the stem conv and the linears run once per image (B rows), their count per image
//! being the same at every step. The list is in state_dict order of the modules, each attention's
//! products after its modules.

use std::collections::HashMap;

use super::params::Entry;
use super::Net;
use crate::graph::{DType, Graph, Role, TensorId};
use crate::ops::{attention, spike_attention};

/// Multiply-accumulates of one layer for one image and one spiking time step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerMacs {
    /// Official module name of the conv / linear (an attention product: `{attn}.{product}`).
    pub name: String,
    pub macs: u64,
    /// The spiking neuron layer whose output this layer reads (None: its input is real-valued).
    pub fed_by: Option<String>,
}

/// The MACs of every conv, linear and attention product of `net` at `size` x `size` input, from
/// its inference graph for one image.
pub(crate) fn net_macs(net: &Net, size: usize) -> Vec<LayerMacs> {
    let mut g = Graph::new();
    let x = g.input("x", &[1, net.img_ch(), size, size]);
    let t = g.input_as("t", &[1], DType::U32);
    let unet = net.build_eval(&mut g, x, t, 1.0);
    graph_macs(&g, &unet.spikes, &net.state_entries())
}

/// The MACs of every conv, linear and attention product in forward graph `g` holding a U-Net
/// whose spiking layers are `spikes` (name, output) and whose state_dict is `entries`.
pub fn graph_macs(g: &Graph, spikes: &[(String, TensorId)], entries: &[Entry]) -> Vec<LayerMacs> {
    // Which spiking layer's values each tensor holds.
    let mut source: HashMap<TensorId, &str> = spikes.iter().map(|(n, s)| (*s, n.as_str())).collect();
    let mut out = Vec::new();
    for node in &g.nodes {
        assert!(!node.label.ends_with(".backward") && !node.label.contains(".grad_"), "MACs count a forward graph");
        let fed_by = |t: &TensorId| source.get(t).map(|s| s.to_string());
        let layer = if let Some((macs, gate)) = spike_attention::node_product(node) {
            Some(LayerMacs { name: node.label.clone(), macs, fed_by: fed_by(&gate) })
        } else if let Some(macs) = attention::node_macs(g, node) {
            let attn = node.label.rsplit_once('.').map_or(&node.label[..], |(m, _)| m);
            Some(LayerMacs { name: format!("{attn}.bmm"), macs, fed_by: None })
        } else if matches!(node.shader.name, "conv" | "matmul") {
            weighted_layer(g, node).map(|(name, macs)| LayerMacs { name, macs, fed_by: fed_by(&node.reads[0]) })
        } else {
            None
        };
        out.extend(layer);
        if node.shader.name == "layout" && node.reads.len() == 1 {
            if let Some(s) = source.get(&node.reads[0]).copied() {
                source.insert(node.writes[0], s);
            }
        }
    }
    // State_dict order: a module at its weight's entry, a product after its attention's last.
    let at: HashMap<&str, usize> =
        entries.iter().enumerate().filter_map(|(i, e)| Some((e.name.strip_suffix(".weight")?, i))).collect();
    let position = |l: &LayerMacs| {
        if let Some(&i) = at.get(l.name.as_str()) {
            return i;
        }
        let parent = l.name.rsplit_once('.').map_or("", |(m, _)| m);
        let last = entries.iter().rposition(|e| e.name.strip_prefix(parent).is_some_and(|r| r.starts_with('.')));
        last.unwrap_or_else(|| panic!("layer {} is in no module of the state_dict", l.name))
    };
    let mut keyed: Vec<(usize, LayerMacs)> = out.into_iter().map(|l| (position(&l), l)).collect();
    keyed.sort_by_key(|(p, _)| *p); // stable: products of one attention keep graph order
    keyed.into_iter().map(|(_, l)| l).collect()
}

/// A conv or linear node's module (named by the weight it reads) and MACs per row: numel(weight)
/// per output position (a conv's H x W, a linear's one).
fn weighted_layer(g: &Graph, node: &crate::graph::Node) -> Option<(String, u64)> {
    let w = g.info(*node.reads.get(1)?);
    if w.role != Role::Param {
        return None;
    }
    let module = w.name.split(" (+").next().unwrap_or(&w.name).strip_suffix(".weight")?;
    let positions: usize = g.shape(node.writes[0])[2..].iter().product();
    Some((module.to_string(), (w.numel() * positions) as u64))
}

//! Dispatch lints over the cifar10 training step at batch 32, planned without a GPU (the graph
//! `profile --dry-run --preset cifar10 --train --batch 32` reports): the step's dispatch count,
//! and bandwidth kernels launched at the width of a large GPU. The conv kernels have lints of
//! their own.

use sddpm_gpu::diffusion::{train_graph, TrainOptions};
use sddpm_gpu::graph::{Graph, Node};
use sddpm_gpu::model::Net;

/// Most dispatches a cifar10 training step may take (1422 before the optimizer arenas).
const MAX_DISPATCHES: usize = 900;

/// Two workgroups per SM of a 132-SM card (an H100 SXM).
const WIDE: u64 = 264;

/// A dispatch moving more than this must be wide.
const LARGE_BYTES: u64 = 4_000_000;

fn cifar10_step() -> Graph {
    let cfg = Net::preset("sddpm", "cifar10").unwrap();
    train_graph(&cfg, 32, 32, &TrainOptions::default()).unwrap()
}

fn workgroups(n: &Node) -> u64 {
    n.workgroups.iter().map(|&w| w as u64).product()
}

/// The last stage of a reduction in several passes: it reads partials, one invocation or one
/// workgroup per output (by convention its entry point ends in `_final`).
fn is_final_stage(n: &Node) -> bool {
    n.entry.ends_with("_final")
}

#[test]
fn a_training_step_takes_at_most_900_dispatches() {
    let g = cifar10_step();
    assert!(g.nodes.len() <= MAX_DISPATCHES, "{} dispatches per cifar10 training step", g.nodes.len());
}

#[test]
fn every_large_non_conv_dispatch_fills_a_large_gpu() {
    let g = cifar10_step();
    let narrow: Vec<String> = g
        .nodes
        .iter()
        .filter(|n| !n.shader.name.starts_with("conv") && n.cost.bytes > LARGE_BYTES)
        .filter(|n| workgroups(n) < WIDE && !is_final_stage(n))
        .map(|n| {
            format!(
                "{}::{} '{}': {} workgroups, {:.1} MB",
                n.shader.name,
                n.entry,
                n.label,
                workgroups(n),
                n.cost.bytes as f64 * 1e-6
            )
        })
        .collect();
    assert!(
        narrow.is_empty(),
        "{} dispatches move > 4 MB on < {WIDE} workgroups:\n{}",
        narrow.len(),
        narrow.join("\n")
    );
}

#[test]
fn final_stages_move_little() {
    // The exemption above is for passes over partials, not for a full pass that is named final.
    let g = cifar10_step();
    for n in g.nodes.iter().filter(|n| is_final_stage(n)) {
        assert!(
            n.cost.bytes <= LARGE_BYTES,
            "{}::{} '{}' moves {} bytes",
            n.shader.name,
            n.entry,
            n.label,
            n.cost.bytes
        );
    }
}

//! The spiking U-Net against the PyTorch reference fixtures, and the model's bookkeeping.

mod common;

use common::*;
use safetensors::SafeTensors;
use sddpm_gpu::checkpoint::Checkpoint;
use sddpm_gpu::model::{parameter_count, EvalNet, ModelConfig, NeuronKind};

/// (x shape, x, t, eps, eps_threshold, threshold) of forward.safetensors.
#[allow(clippy::type_complexity)]
fn forward_fixture() -> (Vec<usize>, Vec<f32>, Vec<u32>, Vec<f32>, Vec<f32>, f32) {
    forward_fixture_in("fixtures")
}

#[allow(clippy::type_complexity)]
fn forward_fixture_in(dir: &str) -> (Vec<usize>, Vec<f32>, Vec<u32>, Vec<f32>, Vec<f32>, f32) {
    let bytes = std::fs::read(fixture_in(dir, "forward.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let f = |n: &str| bytemuck::pod_collect_to_vec::<u8, f32>(st.tensor(n).unwrap().data());
    let t: Vec<i64> = bytemuck::pod_collect_to_vec(st.tensor("t").unwrap().data());
    let shape = st.tensor("x").unwrap().shape().to_vec();
    (shape, f("x"), t.iter().map(|&v| v as u32).collect(), f("eps"), f("eps_threshold"), f("threshold")[0])
}

#[test]
fn forward_matches_reference() {
    let ckpt = Checkpoint::load(&fixture("weights.safetensors")).unwrap();
    let cfg = ckpt.config(None).unwrap();
    let (shape, x, t, eps, _, _) = forward_fixture();
    let net = EvalNet::new(ctx(), &cfg, &ckpt, shape[0], shape[2], 1.0).unwrap();
    let got = net.forward(ctx(), &x, &t).unwrap();
    let err = rel_l2(&got, &eps);
    println!("eps relative L2 error vs PyTorch: {err:e}");
    assert!(err < 1e-4, "eps relative L2 error {err:e}");
}

#[test]
fn threshold_guided_forward_matches_reference() {
    let ckpt = Checkpoint::load(&fixture("weights.safetensors")).unwrap();
    let cfg = ckpt.config(None).unwrap();
    let (shape, x, t, eps, eps_thr, thr) = forward_fixture();
    let net = EvalNet::new(ctx(), &cfg, &ckpt, shape[0], shape[2], thr).unwrap();
    let got = net.forward(ctx(), &x, &t).unwrap();
    let err = rel_l2(&got, &eps_thr);
    assert!(err < 1e-4, "eps_threshold relative L2 error {err:e}");
    assert!(rel_l2(&eps_thr, &eps) > 1e-3, "the guided threshold must change the output");
}

/// Forward and threshold-guided forward of the fixture set `dir` (an extension of the spec's
/// section 10), through the library, within the base fixtures' tolerance.
fn check_forward_fixture(dir: &str) {
    let ckpt = Checkpoint::load(&fixture_in(dir, "weights.safetensors")).unwrap();
    let cfg = ckpt.config(None).unwrap();
    let (shape, x, t, eps, eps_thr, thr) = forward_fixture_in(dir);
    for (v_th, want, key) in [(1.0, &eps, "eps"), (thr, &eps_thr, "eps_threshold")] {
        let net = EvalNet::new(ctx(), &cfg, &ckpt, shape[0], shape[2], v_th).unwrap();
        let got = net.forward(ctx(), &x, &t).unwrap();
        let err = rel_l2(&got, want);
        println!("{dir} {key} relative L2 error vs PyTorch: {err:e}");
        assert!(err < 1e-4, "{dir} {key}: relative L2 error {err:e}");
    }
    assert!(rel_l2(&eps_thr, &eps) > 1e-3, "the guided threshold must change the output");
}

#[test]
fn attention_forward_matches_reference() {
    let cfg = Checkpoint::load(&fixture_in("fixtures-attn", "weights.safetensors")).unwrap().config(None).unwrap();
    assert_eq!((cfg.attn.as_slice(), cfg.heads), (&[1][..], 2), "the fixture must exercise attention");
    check_forward_fixture("fixtures-attn");
}

#[test]
fn lif_forward_matches_reference() {
    let cfg = Checkpoint::load(&fixture_in("fixtures-lif", "weights.safetensors")).unwrap().config(None).unwrap();
    assert_eq!((cfg.neuron, cfg.tau), (NeuronKind::Lif, 2.0), "the fixture must exercise LIF neurons");
    check_forward_fixture("fixtures-lif");
}

/// Our own fixtures (tests/fixtures-*/README.md says how they were made): attention on two
/// levels, both kernel forms, T = 8, 1 channel; and LIF with attention.
#[test]
fn own_attention_fixtures_forward_match_reference() {
    check_forward_fixture("fixtures-attn2-t8");
    check_forward_fixture("fixtures-lif-attn");
}

#[test]
fn extension_keys_are_written_only_when_used() {
    let tiny = ModelConfig::preset("tiny").unwrap();
    let json = serde_json::to_string(&tiny).unwrap();
    for key in ["attn", "heads", "neuron", "tau"] {
        assert!(!json.contains(&format!("\"{key}\"")), "a reference config must not carry {key}: {json}");
    }
    let ext = ModelConfig { attn: vec![1], heads: 2, neuron: NeuronKind::Lif, tau: 1.5, ..tiny };
    let json = serde_json::to_string(&ext).unwrap();
    assert!(
        json.contains("\"attn\":[1]") && json.contains("\"neuron\":\"lif\"") && json.contains("\"tau\":1.5"),
        "{json}"
    );
    assert_eq!(serde_json::from_str::<ModelConfig>(&json).unwrap(), ext);
}

#[test]
fn config_inferred_from_shapes_equals_metadata() {
    let mut ckpt = Checkpoint::load(&fixture("weights.safetensors")).unwrap();
    let from_meta = ckpt.config(None).unwrap();
    ckpt.metadata.clear();
    let inferred = ckpt.config(None).unwrap();
    assert_eq!(inferred, from_meta);
    assert_eq!(inferred.ch_mult, [1, 2]);
    assert_eq!(ckpt.config(Some(8)).unwrap().snn_steps, 8);
}

#[test]
fn cifar10_parameter_count_matches_paper() {
    let cfg = ModelConfig::preset("cifar10").unwrap();
    assert_eq!(parameter_count(&cfg), 66_696_413);
    let mnist = ModelConfig::preset("mnist").unwrap();
    assert_eq!(parameter_count(&mnist), 66_691_725);
}

#[test]
fn unknown_preset_is_an_error() {
    let err = ModelConfig::preset("imagenet").unwrap_err().to_string();
    assert!(err.contains("imagenet") && err.contains("cifar10"), "{err}");
}

#[test]
fn cifar10_macs_per_spiking_step() {
    use sddpm_gpu::model::layer_macs;
    let cfg = ModelConfig::preset("cifar10").unwrap();
    let layers = layer_macs(&cfg, 32);
    let total: u64 = layers.iter().map(|l| l.macs).sum();
    println!("CIFAR-10 MACs per spiking step: {total}");
    assert_eq!((total as f64 / 1e6).round() as u64, 6484, "{total}");
    let first = layers.iter().find(|l| l.name == "conv").unwrap().macs;
    assert_eq!((first as f64 / 1e4).round() as u64, 354, "first conv {first}");
    let linear: u64 =
        layers.iter().filter(|l| l.name.contains("temb") || l.name.starts_with("time_")).map(|l| l.macs).sum();
    assert_eq!((linear as f64 / 1e5).round() as u64, 38, "linear MACs {linear}");
    // 51 spiking layers, each feeding exactly one conv.
    assert_eq!(layers.iter().filter(|l| l.fed_by.is_some()).count(), 51);
}

#[test]
fn folded_conv_bn_equals_conv_then_bn() {
    use sddpm_gpu::graph::TensorId;
    use sddpm_gpu::model::Fold;
    use sddpm_gpu::ops::{batchnorm, conv};
    let ckpt = Checkpoint::load(&fixture("weights.safetensors")).unwrap();
    let fold = Fold {
        conv: "downblocks.2.conv1".into(),
        bn: "downblocks.2.bn1".into(),
        weight: TensorId(0),
        bias: TensorId(0),
    };
    let (wf, bf) = fold.compute(&ckpt).unwrap();
    let w = ckpt.get("downblocks.2.conv1.weight").unwrap();
    let b = &ckpt.get("downblocks.2.conv1.bias").unwrap().data;
    let (cout, cin) = (w.shape[0], w.shape[1]);
    let x = normalish(&mut rng(5), 2 * cin * 8 * 8, 1.0);
    let plain = conv::conv2d_cpu(&x, [2, cin, 8, 8], &w.data, [cout, cin, 3, 3], Some(b), 1, 1);
    let g = |n: &str| ckpt.get(&format!("downblocks.2.bn1.{n}")).unwrap().data.clone();
    let want = batchnorm::batchnorm_eval_cpu(
        &plain,
        cout,
        64,
        &g("weight"),
        &g("bias"),
        &g("running_mean"),
        &g("running_var"),
    );
    let got = conv::conv2d_cpu(&x, [2, cin, 8, 8], &wf, [cout, cin, 3, 3], Some(&bf), 1, 1);
    assert_close("folded conv+BN", &got, &want, 1e-5, 1e-5);
}

/// Both U-Nets are one skeleton: the spiking cifar10 net and its ANN counterpart (same ch,
/// ch_mult and blocks) have the same blocks, names and channels; only attention differs (the
/// ANN has it in its first middle block), and the SNN's --attn levels land where the skeleton
/// puts the ANN's.
#[test]
fn one_skeleton_serves_both_models() {
    use sddpm_gpu::model::{arch, ddpm_arch, skeleton, Block, DdpmConfig};
    let snn = ModelConfig::preset("cifar10").unwrap();
    let ann = DdpmConfig::preset("cifar10").unwrap();
    assert_eq!((snn.ch, &snn.ch_mult, snn.num_res_blocks), (ann.ch, &ann.ch_mult, ann.num_res_blocks));
    let without_attn = |b: &Block| match b {
        Block::Res { name, cin, cout, .. } => Block::Res { name: name.clone(), cin: *cin, cout: *cout, attn: false },
        other => other.clone(),
    };
    let (a, d) = (arch(&snn), ddpm_arch(&ann));
    assert_eq!(a.blocks().map(without_attn).collect::<Vec<_>>(), d.blocks().map(without_attn).collect::<Vec<_>>());
    assert_eq!(a.tail_ch, d.tail_ch);
    let middle = |x: &sddpm_gpu::model::Arch| {
        x.middle.iter().map(|b| matches!(b, Block::Res { attn: true, .. })).collect::<Vec<_>>()
    };
    assert_eq!((middle(&a), middle(&d)), (vec![false, false], vec![true, false]));
    // Level 1's ResBlocks, down and up, carry the attention of either model.
    let s = skeleton(8, &[1, 2, 2], 2, &[1], [false, false]);
    let with: Vec<&str> = s.blocks().filter(|b| matches!(b, Block::Res { attn: true, .. })).map(|b| b.name()).collect();
    assert_eq!(with, ["downblocks.3", "downblocks.4", "upblocks.4", "upblocks.5", "upblocks.6"]);
}

/// The state entries (the recording pass of each model's block builder, which names checkpoint
/// tensors) are exactly the training graph's parameters, names and shapes, plus the BatchNorm
/// counters the host keeps: every preset of both models, and the SNN with attention and LIF.
#[test]
fn state_entries_are_the_training_graphs_parameters() {
    use sddpm_gpu::graph::{DType, Graph, Role};
    use sddpm_gpu::model::{EntryKind, Net, DDPM_PRESETS, PRESETS};
    let mut nets: Vec<Net> = PRESETS.iter().map(|p| Net::preset("sddpm", p).unwrap()).collect();
    nets.extend(DDPM_PRESETS.iter().map(|p| Net::preset("ddpm", p).unwrap()));
    let mut attn = Net::preset("sddpm", "small").unwrap();
    if let Net::Sddpm(c) = &mut attn {
        (c.attn, c.heads, c.neuron) = (vec![1, 2], 2, NeuronKind::Lif);
    }
    nets.push(attn);
    for net in &nets {
        let mut g = Graph::new();
        let s = net.img_size();
        let x = g.input("x", &[1, net.img_ch(), s, s]);
        let t = g.input_as("t", &[1], DType::U32);
        net.build_train(&mut g, x, t, sddpm_gpu::ops::batchnorm::BnGroups::ONE).unwrap();
        let mut graph: Vec<(String, Vec<usize>)> =
            g.tensors.iter().filter(|t| t.role == Role::Param).map(|t| (t.name.clone(), t.shape.clone())).collect();
        let entries = net.state_entries();
        let mut listed: Vec<(String, Vec<usize>)> = entries
            .iter()
            .filter(|e| e.kind != EntryKind::Counter)
            .map(|e| (e.name.clone(), e.shape.clone()))
            .collect();
        graph.sort();
        listed.sort();
        assert_eq!(graph, listed, "{}", net.config_json());
        for e in entries.iter().filter(|e| e.kind == EntryKind::Counter) {
            assert!(e.name.ends_with(".num_batches_tracked") && e.shape.is_empty(), "{}", e.name);
        }
    }
}

/// The MACs are read off the built inference graph (src/model/macs.rs): per image and spiking
/// step whatever the batch, unmoved by nodes others append (the energy report's spike counts),
/// named by the modules whose weights they read, fed by the spiking layer they read (through
/// the Up blocks' upsample), both spiking-attention forms gated as the op says, and in
/// state_dict order. Checked against closed forms on tiny with attention on both levels at
/// 8 x 8 (level 0: N = 64 > d = 16, the [d, d] form; level 1: N = 16 < d = 32, the [N, N] form).
#[test]
fn layer_macs_are_read_off_the_graph() {
    use sddpm_gpu::model::{eval_graph, graph_macs, layer_macs, state_entries, LayerMacs};
    use sddpm_gpu::ops::reduce;
    let cfg = ModelConfig { attn: vec![0, 1], ..ModelConfig::preset("tiny").unwrap() };
    let size = 8;
    let macs = layer_macs(&cfg, size);
    // Batch 3 with a spike count per layer: the same list.
    let (mut g, _, _, unet) = eval_graph(&cfg, 3, size, 1.0).unwrap();
    for (name, s) in &unet.spikes {
        reduce::group_sum(&mut g, *s, 1, &format!("{name}.spike_count"));
    }
    assert_eq!(graph_macs(&g, &unet.spikes, &state_entries(&cfg)), macs);
    let get = |name: &str| macs.iter().find(|l| l.name == name).unwrap_or_else(|| panic!("no MACs for {name}"));
    let fed = |l: &LayerMacs| l.fed_by.clone().unwrap_or_default();
    let (ch, hw) = (16u64, (size * size) as u64);
    assert_eq!((get("conv").macs, fed(get("conv"))), (ch * 3 * 9 * hw, String::new()));
    assert_eq!(get("time_embedding.timembedding.1").macs, ch * 4 * ch);
    assert_eq!(get("downblocks.0.temb_proj.1").macs, 4 * ch * ch);
    // downblocks.1 halves the resolution; upblocks.2 doubles it after its neuron.
    assert_eq!(get("downblocks.1.conv").macs, ch * ch * 9 * hw / 4);
    assert_eq!(
        (get("upblocks.2.conv").macs, fed(get("upblocks.2.conv"))),
        (2 * ch * 2 * ch * 9 * hw, "upblocks.2.neuron".into())
    );
    assert_eq!(fed(get("downblocks.2.shortcut")), "", "a shortcut reads the block's real-valued input");
    // The [d, d] form at level 0: k^T v gated by k, then q M gated by q; c N d MACs each.
    let d_form = ch * hw * ch;
    assert_eq!(
        (get("downblocks.0.attn.kv").macs, fed(get("downblocks.0.attn.kv"))),
        (d_form, "downblocks.0.attn.k_neuron".into())
    );
    assert_eq!(fed(get("downblocks.0.attn.qkv")), "downblocks.0.attn.q_neuron");
    // The [N, N] form at level 1: q k^T gated by q, then A v gated by v; c N N MACs each.
    let n_form = 2 * ch * (hw / 4) * (hw / 4);
    assert_eq!(
        (get("downblocks.2.attn.qk").macs, fed(get("downblocks.2.attn.qk"))),
        (n_form, "downblocks.2.attn.q_neuron".into())
    );
    assert_eq!(
        (get("downblocks.2.attn.qkv").macs, fed(get("downblocks.2.attn.qkv"))),
        (n_form, "downblocks.2.attn.v_neuron".into())
    );
    assert_eq!(fed(get("downblocks.2.attn.k_conv")), "downblocks.2.attn.neuron");
    // State_dict order, each attention's products after its modules.
    let names: Vec<&str> = macs.iter().map(|l| l.name.as_str()).collect();
    let at = |n: &str| names.iter().position(|&m| m == n).unwrap();
    assert!(at("time_embedding.timembedding.3") < at("conv") && at("conv") < at("conv_identity"));
    assert!(at("downblocks.0.temb_proj.1") < at("downblocks.0.conv1"));
    assert!(at("downblocks.0.attn.proj_conv") < at("downblocks.0.attn.kv"));
    assert!(at("downblocks.0.attn.qkv") < at("downblocks.1.conv"));
    assert_eq!(names.last(), Some(&"T_output_layer"));
}

//! Arenas and the optimizer over them: members bound at their offsets (guarded, padding
//! poisoned), the two-stage gradient norm, the multi-tensor clip + Adam and EMA against their CPU
//! references and the per-tensor kernels, determinism, and the gradient buckets of a training
//! step.

mod common;

use common::*;
use sddpm_gpu::diffusion::{train_graph_arenas, TrainOptions};
use sddpm_gpu::graph::{Graph, Layout, Node, Params, Plan, Role, TensorId, ARENA_CHUNK};
use sddpm_gpu::model::{ModelConfig, NeuronKind};
use sddpm_gpu::ops::{elementwise, optim, reduce};

/// Member sizes around every boundary the kernels handle: under one vec4, not a multiple of 4,
/// exactly one alignment block, just past one chunk, several chunks.
const SIZES: [usize; 7] = [1, 3, 64, 777, 4097, 9001, 130];

#[test]
fn arena_members_bind_at_their_offsets() {
    let mut r = rng(60);
    let mut g = Graph::new();
    let params: Vec<TensorId> = SIZES.iter().enumerate().map(|(i, &n)| g.param(&format!("p{i}"), &[n])).collect();
    let inputs: Vec<TensorId> = SIZES.iter().enumerate().map(|(i, &n)| g.input(&format!("d{i}"), &[n])).collect();
    let sums: Vec<TensorId> = params
        .iter()
        .zip(&inputs)
        .enumerate()
        .map(|(i, (&p, &d))| elementwise::add(&mut g, p, d, &format!("s{i}")))
        .collect();
    // The sums live in an intermediate arena and are read back from it by the next nodes.
    let twice: Vec<TensorId> = sums
        .iter()
        .zip(&inputs)
        .enumerate()
        .map(|(i, (&s, &d))| elementwise::add(&mut g, s, d, &format!("t{i}")))
        .collect();
    let layout = Layout::packed(&SIZES);
    g.arena("params", Role::Param, &params, &layout);
    g.arena("sums", Role::Intermediate, &sums, &layout);
    let pv: Vec<Vec<f32>> = SIZES.iter().map(|&n| normalish(&mut r, n, 1.0)).collect();
    let dv: Vec<Vec<f32>> = SIZES.iter().map(|&n| normalish(&mut r, n, 1.0)).collect();
    let mut feed: Vec<(TensorId, Vec<u32>)> = params.iter().zip(&pv).map(|(&t, v)| (t, bits(v))).collect();
    feed.extend(inputs.iter().zip(&dv).map(|(&t, v)| (t, bits(v))));
    let outs: Vec<TensorId> = sums.iter().chain(&twice).copied().collect();
    let got = run_graph(g, &feed, &outs);
    for i in 0..SIZES.len() {
        let s = elementwise::add_cpu(&pv[i], &dv[i]);
        assert_eq!(bits(&got[i]), bits(&s), "member {i} of the intermediate arena");
        assert_eq!(bits(&got[SIZES.len() + i]), bits(&elementwise::add_cpu(&s, &dv[i])), "read back from the arena");
    }
}

#[test]
fn a_write_into_arena_padding_is_caught() {
    let mut g = Graph::new();
    let a = g.param("a", &[5]);
    let b = g.param("b", &[7]);
    let layout = Layout::packed(&[5, 7]);
    g.arena("arena", Role::Param, &[a, b], &layout);
    let x = g.input("x", &[8]);
    // `add` told it has 8 elements writes 3 past the end of `a`, into the padding before `b`.
    g.push(Node {
        shader: &elementwise::SHADER,
        entry: "add",
        params: Params::of(&[8u32, 0, 0, 0]),
        reads: vec![x, x],
        writes: vec![a],
        workgroups: [1, 1, 1],
        label: "overrun".into(),
        cost: Default::default(),
    });
    let c = ctx();
    let plan = Plan::compile_guarded(c, &g).unwrap();
    plan.write(c, x, &[1f32; 8]).unwrap();
    plan.run(c).unwrap();
    let err = plan.check_guards(c).unwrap_err().to_string();
    assert!(err.contains("'a'") && err.contains("arena padding"), "{err}");
}

#[test]
fn reading_and_writing_one_arena_in_a_node_is_a_graph_error() {
    let mut g = Graph::new();
    let a = g.input("a", &[4]);
    let b = g.input("b", &[4]);
    let s = elementwise::add(&mut g, a, b, "s");
    let t = elementwise::add(&mut g, s, b, "t");
    g.arena("arena", Role::Intermediate, &[s, t], &Layout::packed(&[4, 4]));
    let err = g.check().unwrap_err().to_string();
    assert!(err.contains("node 't'") && err.contains("arena 'arena'"), "{err}");
}

/// Inputs of `SIZES` in arenas of at most `cap` bytes (several), with their chunk tables.
fn input_arenas(g: &mut Graph, cap: u64) -> (Vec<TensorId>, Vec<(TensorId, TensorId)>) {
    let members: Vec<TensorId> = SIZES.iter().enumerate().map(|(i, &n)| g.input(&format!("x{i}"), &[n])).collect();
    let mut arenas = Vec::new();
    for range in sddpm_gpu::graph::split_members(&SIZES, cap) {
        let layout = Layout::packed(&SIZES[range.clone()]);
        let arena = g.arena(&format!("arena{}", arenas.len()), Role::Input, &members[range], &layout);
        let table = layout.chunks(ARENA_CHUNK);
        let chunks = g.constant_u32(&format!("chunks{}", arenas.len()), &[table.len(), 2], table.concat());
        arenas.push((arena, chunks));
    }
    (members, arenas)
}

#[test]
fn grad_norm_over_arenas_matches_cpu_and_repeats_bit_for_bit() {
    let mut r = rng(61);
    let values: Vec<Vec<f32>> = SIZES.iter().map(|&n| normalish(&mut r, n, 2.0)).collect();
    let want = reduce::sumsq_cpu(values.iter().map(|v| &v[..]));
    for cap in [40 << 10, 1 << 20] {
        let mut g = Graph::new();
        let (members, arenas) = input_arenas(&mut g, cap);
        assert_eq!(arenas.len(), if cap == 1 << 20 { 1 } else { 2 }, "cap {cap}");
        let sumsq = reduce::sumsq_arenas(&mut g, &arenas, "norm");
        g.mark_output(sumsq);
        // Guarded: the padding between members is NaN, so a sum that reads it is NaN.
        let c = ctx();
        let plan = Plan::compile_guarded(c, &g).unwrap();
        for (t, v) in members.iter().zip(&values) {
            plan.write(c, *t, v).unwrap();
        }
        let mut runs = Vec::new();
        for _ in 0..2 {
            plan.run(c).unwrap();
            runs.push(plan.read(c, sumsq).unwrap()[0]);
        }
        plan.check_guards(c).unwrap();
        assert!(((runs[0] - want) / want).abs() < 1e-5, "cap {cap}: {} vs {want}", runs[0]);
        assert_eq!(runs[0].to_bits(), runs[1].to_bits(), "run to run");
    }
}

/// A graph whose gradients of `SIZES`-shaped parameters are given (grad = d + 0, exact), in
/// optimizer arenas of at most `cap` bytes, with the norm, clip + Adam and the EMA.
struct Step {
    g: Graph,
    params: Vec<TensorId>,
    d: Vec<TensorId>,
    zeros: Vec<TensorId>,
    arenas: optim::Arenas,
    sumsq: TensorId,
    hyper: TensorId,
}

fn optimizer_step(cap: u64) -> Step {
    let mut g = Graph::new();
    let params: Vec<TensorId> = SIZES.iter().enumerate().map(|(i, &n)| g.param(&format!("p{i}"), &[n])).collect();
    let d: Vec<TensorId> = SIZES.iter().enumerate().map(|(i, &n)| g.input(&format!("d{i}"), &[n])).collect();
    let zeros: Vec<TensorId> = SIZES.iter().enumerate().map(|(i, &n)| g.input(&format!("z{i}"), &[n])).collect();
    let mut trainable = Vec::new();
    for i in 0..SIZES.len() {
        let grad = elementwise::add(&mut g, d[i], zeros[i], &format!("grad{i}"));
        trainable.push((format!("p{i}"), params[i], grad));
    }
    let arenas = optim::arenas_capped(&mut g, &trainable, true, cap);
    let inputs: Vec<(TensorId, TensorId)> = arenas.arenas.iter().map(|a| (a.grad, a.chunks)).collect();
    let sumsq = reduce::sumsq_arenas(&mut g, &inputs, "grad_norm");
    let hyper = g.input("hyper", &[4]);
    optim::adam_arenas(&mut g, &optim::Adam::default(), &arenas, sumsq, hyper, "adam");
    optim::ema_arenas(&mut g, &arenas, 0.9, "ema");
    g.mark_output(sumsq);
    Step { g, params, d, zeros, arenas, sumsq, hyper }
}

#[test]
fn adam_and_ema_over_arenas_match_cpu_and_the_per_tensor_kernel() {
    let adam = optim::Adam::default();
    let mut r = rng(62);
    let n = SIZES.len();
    let pv: Vec<Vec<f32>> = SIZES.iter().map(|&k| normalish(&mut r, k, 1.0)).collect();
    let gv: Vec<Vec<f32>> = SIZES.iter().map(|&k| normalish(&mut r, k, 0.05)).collect();
    let mv: Vec<Vec<f32>> = SIZES.iter().map(|&k| normalish(&mut r, k, 0.01)).collect();
    let vv: Vec<Vec<f32>> = SIZES.iter().map(|&k| uniform(&mut r, k, 0.0, 1e-4)).collect();
    let ev: Vec<Vec<f32>> = SIZES.iter().map(|&k| normalish(&mut r, k, 1.0)).collect();
    // max_norm 1 clips (the norm is ~4), 1e3 does not.
    for (step, max_norm, cap) in [(1u64, 1.0f32, 40u64 << 10), (7, 1e3, 1 << 20)] {
        let hyper = optim::hyper(&adam, 2e-4, step, max_norm);
        let s = optimizer_step(cap);
        assert_eq!(s.arenas.arenas.len(), if cap == 1 << 20 { 1 } else { 2 });
        let c = ctx();
        let plan = Plan::compile_guarded(c, &s.g).unwrap();
        let upload = |plan: &Plan| {
            for (i, m) in s.arenas.members.iter().enumerate() {
                let k: usize = m.name[1..].parse().unwrap();
                assert_eq!(m.param, s.params[k], "member {i}");
                plan.write(c, m.param, &pv[k]).unwrap();
                plan.write(c, m.exp_avg, &mv[k]).unwrap();
                plan.write(c, m.exp_avg_sq, &vv[k]).unwrap();
                plan.write(c, m.ema.unwrap(), &ev[k]).unwrap();
            }
            for k in 0..n {
                plan.write(c, s.d[k], &gv[k]).unwrap();
                plan.write(c, s.zeros[k], &vec![0f32; SIZES[k]]).unwrap();
            }
            plan.write(c, s.hyper, &hyper).unwrap();
        };
        let read_all = |plan: &Plan| -> Vec<Vec<u32>> {
            let mut out = Vec::new();
            for m in &s.arenas.members {
                for t in [m.param, m.exp_avg, m.exp_avg_sq, m.ema.unwrap()] {
                    out.push(bits(&plan.read(c, t).unwrap()));
                }
            }
            out
        };
        upload(&plan);
        plan.run(c).unwrap();
        plan.check_guards(c).unwrap();
        let sumsq = plan.read(c, s.sumsq).unwrap()[0];
        let first = read_all(&plan);
        // Bit for bit again from the same state.
        upload(&plan);
        plan.run(c).unwrap();
        assert_eq!(first, read_all(&plan), "step {step}: run to run");

        // The per-tensor kernel on the same inputs and the same sum gives the same bits.
        let mut g1 = Graph::new();
        let mut per = Vec::new();
        let ss = g1.input("sumsq", &[1]);
        let hy = g1.input("hyper", &[4]);
        for (k, &len) in SIZES.iter().enumerate() {
            let (p, gr) = (g1.param(&format!("p{k}"), &[len]), g1.input(&format!("g{k}"), &[len]));
            let (m, v) = (g1.param(&format!("m{k}"), &[len]), g1.param(&format!("v{k}"), &[len]));
            optim::adam_step(&mut g1, &adam, p, gr, m, v, ss, hy, &format!("adam{k}"));
            per.push((p, gr, m, v));
        }
        let mut feed = vec![(ss, bits(&[sumsq])), (hy, bits(&hyper))];
        for (k, &(p, gr, m, v)) in per.iter().enumerate() {
            feed.extend([(p, bits(&pv[k])), (gr, bits(&gv[k])), (m, bits(&mv[k])), (v, bits(&vv[k]))]);
        }
        let outs: Vec<TensorId> = per.iter().flat_map(|&(p, _, m, v)| [p, m, v]).collect();
        let single = run_graph(g1, &feed, &outs);

        let want_sumsq = reduce::sumsq_cpu(gv.iter().map(|v| &v[..]));
        assert!(((sumsq - want_sumsq) / want_sumsq).abs() < 1e-5, "norm {sumsq} vs {want_sumsq}");
        for (i, m) in s.arenas.members.iter().enumerate() {
            let k: usize = m.name[1..].parse().unwrap();
            let got: Vec<Vec<f32>> =
                first[4 * i..4 * i + 4].iter().map(|w| w.iter().map(|&b| f32::from_bits(b)).collect()).collect();
            for (j, what) in ["param", "exp_avg", "exp_avg_sq"].iter().enumerate() {
                assert_eq!(
                    bits(&got[j]),
                    bits(&single[3 * k + j]),
                    "{what} of p{k} ({} values): arena vs per-tensor",
                    SIZES[k]
                );
            }
            let (mut pc, mut mc, mut vc) = (pv[k].clone(), mv[k].clone(), vv[k].clone());
            optim::adam_cpu(&adam, &mut pc, &gv[k], &mut mc, &mut vc, sumsq, hyper);
            assert_close(&format!("adam p{k}"), &got[0], &pc, 1e-6, 1e-7);
            assert_close(&format!("adam m{k}"), &got[1], &mc, 1e-6, 1e-8);
            assert_close(&format!("adam v{k}"), &got[2], &vc, 1e-6, 1e-10);
            assert!(got[0].iter().zip(&pv[k]).any(|(a, b)| a != b), "the parameters of p{k} move");
            // The EMA runs after Adam: it averages the updated weights.
            let mut ec = ev[k].clone();
            optim::ema_cpu(&mut ec, &got[0], 0.9);
            assert_close(&format!("ema p{k}"), &got[3], &ec, 1e-6, 1e-7);
        }
    }
}

fn toy_config() -> ModelConfig {
    ModelConfig {
        diffusion_steps: 1000,
        ch: 8,
        ch_mult: vec![1, 2],
        num_res_blocks: 1,
        snn_steps: 2,
        img_ch: 1,
        img_size: 16,
        attn: Vec::new(),
        heads: 1,
        neuron: NeuronKind::If,
        tau: 2.0,
    }
}

#[test]
fn gradient_buckets_are_final_after_their_node() {
    let (g, arenas) = train_graph_arenas(&toy_config().into(), 2, 16, &TrainOptions::default()).unwrap();
    let members = &arenas.members;
    assert!(members.windows(2).all(|w| w[0].ready_after <= w[1].ready_after), "members in gradient order");
    for max_bytes in [1024u64, 4096, 1 << 20] {
        let buckets = arenas.grad_buckets(max_bytes);
        let covered: Vec<usize> = buckets.iter().flat_map(|b| b.members.clone()).collect();
        assert_eq!(covered, (0..members.len()).collect::<Vec<_>>(), "every member once, in order");
        for b in &buckets {
            assert!(b.bytes <= max_bytes || b.members.len() == 1, "{b:?} over {max_bytes} bytes");
            let ms = &members[b.members.clone()];
            assert!(ms.iter().all(|m| m.arena == b.arena && g.storage(m.grad) == (b.tensor, 4 * m.offset as u64)));
            assert_eq!(b.offset, 4 * ms[0].offset as u64);
            assert_eq!(b.offset + b.bytes, 4 * (ms[ms.len() - 1].offset + ms[ms.len() - 1].len) as u64);
            // Complete after ready_after: no later node writes any of its members.
            let grads: Vec<TensorId> = ms.iter().map(|m| m.grad).collect();
            for (i, n) in g.nodes.iter().enumerate().skip(b.ready_after + 1) {
                assert!(!n.writes.iter().any(|w| grads.contains(w)), "node {i} '{}' writes into {b:?}", n.label);
            }
            assert!(g.nodes[b.ready_after].writes.iter().any(|w| grads.contains(w)), "ready_after is a writer");
        }
    }
}

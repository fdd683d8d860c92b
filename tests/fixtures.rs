//! Parity with the PyTorch reference fixtures (tests/fixtures, copied from shared/reference).

mod common;

use common::*;
use safetensors::SafeTensors;
use sddpm_gpu::graph::{backward, Graph};
use sddpm_gpu::ops::{elementwise, neuron};

fn load(name: &str) -> Vec<u8> {
    std::fs::read(fixture(name)).unwrap()
}

fn tensor(st: &SafeTensors, name: &str) -> (Vec<usize>, Vec<f32>) {
    let t = st.tensor(name).unwrap_or_else(|e| panic!("fixture tensor {name}: {e}"));
    assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name}");
    (t.shape().to_vec(), bytemuck::pod_collect_to_vec(t.data()))
}

#[test]
fn neuron_spikes_match_reference_exactly() {
    let bytes = load("neuron.safetensors");
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (shape, x) = tensor(&st, "x");
    let (_, want) = tensor(&st, "spikes");
    let (t, n) = (shape[0], shape[1]);
    let mut g = Graph::new();
    let xt = g.input("x", &[t, n]);
    let s = neuron::neuron_forward(&mut g, xt, t, neuron::Neuron::default(), "neuron");
    let (s_train, _) = neuron::neuron_forward_train(&mut g, xt, t, neuron::Neuron::default(), "neuron.train");
    let out = run_graph(g, &[(xt, bits(&x))], &[s, s_train]);
    let fired = want.iter().filter(|&&v| v == 1.0).count();
    assert!(fired > 0 && fired < want.len());
    assert_eq!(out[0], want, "GPU spikes differ from the reference");
    assert_eq!(out[1], want, "GPU training-form spikes differ from the reference");
    assert_eq!(neuron::neuron_cpu(&x, t, neuron::Neuron::default()).0, want, "CPU reference differs");
}

/// The LIF neuron (tau 2, decay_input) of fixtures-lif: spikes exactly, and the surrogate gradient
/// through time against PyTorch's autograd.
#[test]
fn lif_neuron_matches_reference() {
    let bytes = std::fs::read(fixture_in("fixtures-lif", "neuron.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (shape, x) = tensor(&st, "x");
    let (_, want) = tensor(&st, "spikes");
    let (_, grad_out) = tensor(&st, "grad_out");
    let (_, want_dx) = tensor(&st, "grad_x");
    let (t, n) = (shape[0], shape[1]);
    let lif = neuron::Neuron { tau: Some(2.0), ..Default::default() };
    let mut g = Graph::new();
    let xt = g.input("x", &[t, n]);
    let s = neuron::neuron_forward(&mut g, xt, t, lif, "neuron");
    let (s_train, _) = neuron::neuron_forward_train(&mut g, xt, t, lif, "neuron.train");
    let gs = g.input("grad_out", &[t, n]);
    let dx_gpu = backward(&mut g, s_train, gs, &[xt], elementwise::add)[&xt];
    let out = run_graph(g, &[(xt, bits(&x)), (gs, bits(&grad_out))], &[s, s_train, dx_gpu]);
    let fired = want.iter().filter(|&&v| v == 1.0).count();
    assert!(fired > 0 && fired < want.len());
    assert_eq!(out[0], want, "GPU LIF spikes differ from the reference");
    assert_eq!(out[1], want, "GPU training-form LIF spikes differ from the reference");
    assert_eq!(neuron::neuron_cpu(&x, t, lif).0, want, "CPU reference differs");
    // The IF neuron on the same input fires differently: the fixture does test the leak.
    assert_ne!(neuron::neuron_cpu(&x, t, neuron::Neuron::default()).0, want);
    let h = neuron::neuron_cpu(&x, t, lif).1;
    let dx = neuron::neuron_backward_cpu(&grad_out, &h, t, lif);
    assert_close("LIF grad_x (CPU)", &dx, &want_dx, 1e-5, 1e-6);
    assert_close("LIF grad_x (GPU)", &out[2], &want_dx, 1e-5, 1e-6);
}

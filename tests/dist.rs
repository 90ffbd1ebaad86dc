//! Data parallelism without GPUs: the in-process communicator, W ranks equal one rank with W× the batch,
//! rank discovery, the rendezvous over loopback (real processes), the supervisor, and the buckets.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bertcuda::dist::{buckets, rendezvous, Comm, InProcess, RankInfo, ID_BYTES};
use bertcuda::model::config::ModelConfig;
use bertcuda::model::params::ParamTable;
use bertcuda::train::{train, train_in_process, TrainConfig, TrainSummary};

mod common;

fn shards_and_config(dir: &Path) -> (PathBuf, PathBuf) {
    let tok = common::sample_shards(dir, 1200, 500);
    let mut c = common::small_model(tok.vocab_size, 32, 2, 64, 64);
    // Dropout masks are keyed by position in a rank's batch: compare with dropout off.
    c.hidden_dropout_prob = 0.0;
    c.attention_probs_dropout_prob = 0.0;
    let config = dir.join("config.json");
    c.save(&config).unwrap();
    (dir.join("shards"), config)
}

fn read_f32s(path: &Path) -> Vec<(String, Vec<f32>)> {
    let bytes = fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<(String, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| {
            (n, t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect())
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// W ranks made the run of one rank with W× the batch: every rank's losses and the saved weights within
/// 1e-5 of it.
fn assert_same_run(one: &TrainSummary, ranks: &[TrainSummary], one_dir: &Path, ranks_dir: &Path) {
    for r in ranks {
        for (a, b) in one.losses.iter().zip(&r.losses) {
            assert!((a - b).abs() <= 1e-5 * a.abs(), "{:?} vs {:?}", one.losses, r.losses);
        }
    }
    for ((n, a), (_, b)) in read_f32s(&one_dir.join("model.safetensors"))
        .iter()
        .zip(read_f32s(&ranks_dir.join("model.safetensors")))
    {
        let err = a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(err < 1e-5, "{n}: {err}");
    }
}

#[test]
fn two_ranks_equal_one_rank_with_twice_the_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let (shards, config) = shards_and_config(tmp.path());
    let base = |out: &str, batch: usize| TrainConfig {
        data: vec![shards.clone()],
        output: tmp.path().join(out),
        model_config: config.to_str().unwrap().into(),
        per_device_batch_size: batch,
        max_seq_len: 32,
        pad_to_max: true,
        learning_rate: 2e-3,
        warmup_steps: Some(1),
        max_steps: Some(6),
        logging_steps: 1,
        save_steps: 3,
        progress: false,
        ..TrainConfig::default()
    };
    let one = train(base("one", 8), Arc::new(AtomicBool::new(false))).unwrap();
    let two = train_in_process(base("two", 4), 2, Arc::new(AtomicBool::new(false))).unwrap();
    assert_eq!(two.len(), 2);
    assert_same_run(&one, &two, &tmp.path().join("one"), &tmp.path().join("two"));
    // With accumulation and small gradient buckets (reduced as backward completes them, on the last
    // micro-batch only): still the larger batch.
    let acc = |out: &str, batch: usize| TrainConfig {
        gradient_accumulation_steps: 2,
        bucket_size_mb: 0.01,
        ..base(out, batch)
    };
    let one = train(acc("one-acc", 8), Arc::new(AtomicBool::new(false))).unwrap();
    let two = train_in_process(acc("two-acc", 4), 2, Arc::new(AtomicBool::new(false))).unwrap();
    assert_same_run(&one, &two, &tmp.path().join("one-acc"), &tmp.path().join("two-acc"));
    // Rank 0 alone wrote the checkpoints, with the world size recorded.
    let state = bertcuda::checkpoint::verify(&tmp.path().join("two/checkpoint-000006")).unwrap();
    assert_eq!(state.world_size, 2);
    // Resuming with another world size is refused.
    let e = train(
        TrainConfig { resume: Some("auto".into()), ..base("two", 4) },
        Arc::new(AtomicBool::new(false)),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("2 ranks") && e.contains("this run has 1"), "{e}");
}

#[test]
fn two_emulated_devices_equal_one_with_twice_the_batch() {
    // The CUDA backend's data-parallel path on two emulated devices in this process: gradient buckets
    // reduced through the in-process communicator as backward completes them, with accumulation.
    let tmp = tempfile::tempdir().unwrap();
    let (shards, config) = shards_and_config(tmp.path());
    let cfg = |out: &str, batch: usize| TrainConfig {
        data: vec![shards.clone()],
        output: tmp.path().join(out),
        model_config: config.to_str().unwrap().into(),
        device: bertcuda::backend::choice::Device::Emu,
        precision: bertcuda::backend::choice::Precision::Fp32,
        per_device_batch_size: batch,
        max_seq_len: 32,
        pad_to_max: true,
        learning_rate: 2e-3,
        warmup_steps: Some(1),
        max_steps: Some(3),
        gradient_accumulation_steps: 2,
        bucket_size_mb: 0.01,
        logging_steps: 1,
        save_steps: 3,
        progress: false,
        ..TrainConfig::default()
    };
    let one = train(cfg("one", 8), Arc::new(AtomicBool::new(false))).unwrap();
    let two = train_in_process(cfg("two", 4), 2, Arc::new(AtomicBool::new(false))).unwrap();
    assert_eq!(two.len(), 2);
    assert_same_run(&one, &two, &tmp.path().join("one"), &tmp.path().join("two"));
}

#[test]
fn in_process_sums_are_exact_and_a_failed_rank_stops_the_others() {
    let comms = InProcess::group(3, Duration::from_secs(5));
    std::thread::scope(|s| {
        for c in &comms {
            s.spawn(move || {
                let mut v = vec![c.rank() as f32 + 0.5, 1.0];
                c.all_reduce_sum(&mut v).unwrap();
                assert_eq!(v, [4.5, 3.0]);
                let mut d = [c.rank() as f64];
                c.all_reduce_sum_f64(&mut d).unwrap();
                assert_eq!(d, [3.0]);
                c.barrier().unwrap();
            });
        }
    });
    let comms = InProcess::group(2, Duration::from_secs(5));
    let t = Instant::now();
    std::thread::scope(|s| {
        let a = s.spawn(|| {
            let mut v = [1.0f32];
            comms[0].all_reduce_sum(&mut v)
        });
        comms[1].fail("out of memory");
        let e = a.join().unwrap().unwrap_err().to_string();
        assert!(e.contains("rank 1 failed: out of memory"), "{e}");
    });
    assert!(t.elapsed() < Duration::from_secs(4));
    // A rank that never comes: the others time out, naming the wait.
    let comms = InProcess::group(2, Duration::from_millis(300));
    let mut v = [1.0f32];
    let e = comms[0].all_reduce_sum(&mut v).unwrap_err().to_string();
    assert!(e.contains("did not reach the collective"), "{e}");
}

#[test]
fn ranks_come_from_torchrun_or_slurm_variables() {
    let env = |pairs: &'static [(&'static str, &'static str)]| {
        move |k: &str| pairs.iter().find(|p| p.0 == k).map(|p| p.1.to_string())
    };
    assert_eq!(RankInfo::from_env(env(&[])).unwrap(), None);
    let r = RankInfo::from_env(env(&[
        ("RANK", "3"),
        ("WORLD_SIZE", "8"),
        ("LOCAL_RANK", "1"),
        ("MASTER_ADDR", "node0"),
        ("MASTER_PORT", "29500"),
    ]))
    .unwrap()
    .unwrap();
    assert_eq!(
        (r.rank, r.world, r.local_rank, r.master_addr.as_str(), r.master_port),
        (3, 8, 1, "node0", 29500)
    );
    let r = RankInfo::from_env(env(&[
        ("SLURM_PROCID", "5"),
        ("SLURM_NTASKS", "16"),
        ("SLURM_LOCALID", "5"),
        ("MASTER_PORT", "1234"),
    ]))
    .unwrap()
    .unwrap();
    assert_eq!((r.rank, r.world, r.local_rank), (5, 16, 5));
    for (bad, want) in [
        (&[("RANK", "3")][..], "together"),
        (&[("RANK", "8"), ("WORLD_SIZE", "8"), ("MASTER_PORT", "1")][..], "rank 8"),
        (&[("RANK", "x"), ("WORLD_SIZE", "8")][..], "RANK=\"x\""),
        (&[("RANK", "0"), ("WORLD_SIZE", "2")][..], "MASTER_PORT"),
    ] {
        let bad: &'static [(&'static str, &'static str)] = Box::leak(bad.to_vec().into_boxed_slice());
        let e = RankInfo::from_env(env(bad)).unwrap_err().to_string();
        assert!(e.contains(want), "{e}");
    }
}

fn info(rank: usize, world: usize, port: u16) -> RankInfo {
    RankInfo { rank, world, local_rank: rank, master_addr: "127.0.0.1".into(), master_port: port }
}

#[test]
fn rendezvous_hands_rank_zeros_id_to_every_rank_or_fails_clearly() {
    let port = bertcuda::dist::free_port().unwrap();
    let id = [7u8; ID_BYTES];
    let got: Vec<[u8; ID_BYTES]> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..3)
            .map(|r| {
                s.spawn(move || {
                    rendezvous(&info(r, 3, port), (r == 0).then_some(id), Duration::from_secs(10)).unwrap()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(got.iter().all(|g| *g == id));

    // A rank with another world size.
    let port = bertcuda::dist::free_port().unwrap();
    std::thread::scope(|s| {
        let zero = s.spawn(move || rendezvous(&info(0, 2, port), Some(id), Duration::from_secs(5)));
        let one = rendezvous(&info(1, 3, port), None, Duration::from_secs(5)).unwrap_err().to_string();
        assert!(one.contains("world size 3") && one.contains("rank 0 with 2"), "{one}");
        let e = zero.join().unwrap().unwrap_err().to_string();
        assert!(e.contains("world size 3"), "{e}");
    });

    // A rank that never comes: rank 0 names it, within the timeout.
    let port = bertcuda::dist::free_port().unwrap();
    let t = Instant::now();
    let e = rendezvous(&info(0, 2, port), Some(id), Duration::from_millis(500)).unwrap_err().to_string();
    assert!(e.contains("ranks [1]") && e.contains("did not arrive"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(3));

    // The port in use.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let e = rendezvous(&info(0, 2, port), Some(id), Duration::from_millis(500)).unwrap_err().to_string();
    assert!(e.contains("port in use") || e.contains("cannot listen"), "{e}");
}

fn rank_process(rank: usize, world: usize, port: u16, timeout_ms: u64) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_bertcuda"))
        .args(["debug-rendezvous", "--timeout-ms", &timeout_ms.to_string()])
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn real_processes_meet_on_loopback_and_a_missing_rank_is_named() {
    let port = bertcuda::dist::free_port().unwrap();
    let kids: Vec<_> = (0..3).map(|r| rank_process(r, 3, port, 20_000)).collect();
    let outs: Vec<String> = kids
        .into_iter()
        .map(|k| {
            let o = k.wait_with_output().unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            String::from_utf8(o.stdout).unwrap()
        })
        .collect();
    let ids: Vec<&str> = outs.iter().map(|o| o.trim().rsplit(' ').next().unwrap()).collect();
    assert!(ids.iter().all(|i| *i == ids[0] && i.len() == 2 * ID_BYTES), "{outs:?}");

    let port = bertcuda::dist::free_port().unwrap();
    let t = Instant::now();
    let kids: Vec<_> = (0..2).map(|r| rank_process(r, 3, port, 1500)).collect();
    for (r, k) in kids.into_iter().enumerate() {
        let o = k.wait_with_output().unwrap();
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        if r == 0 {
            assert!(err.contains("ranks [2]") && err.contains("did not arrive"), "{err}");
        } else {
            assert!(err.contains("rank 1"), "{err}");
        }
    }
    assert!(t.elapsed() < Duration::from_secs(10));
}

#[test]
fn the_supervisor_stops_the_job_when_a_rank_dies_and_names_it() {
    let tmp = tempfile::tempdir().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_bertcuda"))
        .args(["train", "--nproc-per-node", "2", "--device", "cpu", "--data"])
        .arg(tmp.path().join("none"))
        .arg("--output")
        .arg(tmp.path().join("out"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("[rank ") && err.contains("multi-process training needs GPUs"), "{err}");
    assert!(err.contains("error: rank ") && err.contains("exited with"), "{err}");
}

#[test]
fn buckets_cover_the_gradients_once_in_backward_order() {
    let c = ModelConfig::preset("mini", 30522).unwrap();
    let table = ParamTable::new(&c);
    let cap = 200_000;
    let b = buckets(&table, cap);
    let mut covered = vec![false; table.total];
    for x in &b {
        for c in &mut covered[x.start..x.start + x.len] {
            assert!(!*c, "an element in two buckets");
            *c = true;
        }
    }
    assert!(covered.iter().all(|c| *c));
    // Ordered as backward produces them: offsets fall; readiness never goes back up.
    assert!(b.windows(2).all(|w| w[1].start + w[1].len == w[0].start));
    // Embeddings (the word embeddings are tied to the decoder) are ready only at the very end.
    let word = table.get("bert.embeddings.word_embeddings.weight").unwrap();
    assert!(b
        .iter()
        .filter(|x| x.start <= word.offset && word.offset < x.start + x.len)
        .all(|x| x.ready_after_layer.is_none()));
    // Buckets of encoder layers only hold at most the cap (one parameter may exceed it alone).
    assert!(b
        .iter()
        .all(|x| x.len <= cap || table.params.iter().any(|p| p.offset == x.start && p.len == x.len)));
    assert!(
        b.iter().any(|x| x.ready_after_layer == Some(3)) && b.iter().any(|x| x.ready_after_layer == Some(0))
    );
}

#[test]
fn a_foreign_service_on_the_port_is_not_taken_for_rank_zero() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let (mut s, _) = l.accept().unwrap();
        let mut buf = [0u8; 64];
        let _ = s.read(&mut buf);
        // The client may already have given up on this peer and closed: a failed write is no failure here.
        let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
    });
    let e = rendezvous(&info(1, 2, port), None, Duration::from_secs(5)).unwrap_err().to_string();
    assert!(e.contains("not a bertcuda rendezvous"), "{e}");
    server.join().unwrap();
}

#[cfg(unix)]
#[test]
fn the_supervisor_passes_sigterm_to_its_ranks_which_save_and_exit_zero() {
    let tmp = tempfile::tempdir().unwrap();
    let (shards, config) = shards_and_config(tmp.path());
    let out = tmp.path().join("out");
    let child = Command::new(env!("CARGO_BIN_EXE_bertcuda"))
        .args([
            "train",
            "--nproc-per-node",
            "1",
            "--device",
            "cpu",
            "--quiet",
            "--max-steps",
            "100000",
            "--save-steps",
            "100000",
            "--max-seq-len",
            "32",
            "--per-device-batch-size",
            "4",
        ])
        .arg("--data")
        .arg(&shards)
        .arg("--model-config")
        .arg(&config)
        .arg("--output")
        .arg(&out)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !(out.join("metrics.jsonl").is_file()
        && fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines().count() >= 3)
    {
        assert!(t.elapsed() < Duration::from_secs(60), "no training steps");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("[rank 0]") && err.contains("stopped by a signal"), "{err}");
    let (found, _) = bertcuda::checkpoint::find_resume(&out);
    assert!(found.is_some());
}

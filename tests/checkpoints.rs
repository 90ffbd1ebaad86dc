//! Hugging Face checkpoints in and out, a real one (all-MiniLM-L6-v2) against transformers' outputs, and
//! the model commands.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use bertcuda::infer::{embed, LoadedModel, Pooling};
use bertcuda::model::config::ModelConfig;
use bertcuda::model::hf::{load_pretrained, safetensors_bytes, save_pretrained};
use bertcuda::model::params::ParamTable;
use safetensors::SafeTensors;

mod common;
use common::root;

/// all-MiniLM-L6-v2, fetched by scripts/fetch-test-models.sh (the README's test command runs it).
fn minilm_dir() -> PathBuf {
    let dir = std::env::var("BERTCUDA_MINILM")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root().join(".cache/models/all-MiniLM-L6-v2"));
    assert!(
        dir.join("model.safetensors").is_file(),
        "{} is missing: run scripts/fetch-test-models.sh (part of the README's test command)",
        dir.display()
    );
    dir
}

fn small_config() -> ModelConfig {
    common::small_model(31, 16, 4, 24, 20)
}

#[test]
fn minilm_embeddings_equal_transformers() {
    let dir = minilm_dir();
    let expected: serde_json::Value = serde_json::from_str(
        &fs::read_to_string(root().join("tests/fixtures/minilm/expected.json")).unwrap(),
    )
    .unwrap();
    let model = LoadedModel::load(&dir).unwrap();
    assert_eq!(model.config.hidden_size, 384);
    assert_eq!(model.config.num_hidden_layers, 6);
    // A bare BertModel: the heads are initialised, the encoder and pooler loaded.
    assert!(!model.has_mlm_head() && !model.has_nsp_head(), "a bare BertModel: its heads run initialised");
    assert!(model.report.initialised.iter().all(|n| n.starts_with("cls.")), "{:?}", model.report.initialised);
    assert_eq!(model.report.loaded.len(), 103);
    assert!(model.report.ignored.iter().any(|n| n.contains("position_ids")));

    let tok = bertcuda::infer::model_tokenizer(&dir).unwrap();
    let texts: Vec<String> = serde_json::from_value(expected["texts"].clone()).unwrap();
    for (i, t) in texts.iter().enumerate() {
        let ids = tok.encode_with_specials(t, None).unwrap().0;
        let want: Vec<u32> = serde_json::from_value(expected["input_ids"][i].clone()).unwrap();
        assert_eq!(ids, want[..ids.len()]);
    }
    for (key, pooling) in [("pooler", Pooling::Pooler), ("cls", Pooling::Cls), ("mean", Pooling::Mean)] {
        let got = embed(bertcuda::backend::choice::Device::Cpu, &model, &tok, &texts, pooling).unwrap();
        let want: Vec<Vec<f32>> = serde_json::from_value(expected[key].clone()).unwrap();
        for (g, w) in got.iter().zip(&want) {
            let err = g.iter().zip(w).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(err < 1e-4, "{key}: max abs difference {err}");
        }
    }
}

#[test]
fn save_then_load_gives_the_same_parameters_in_hf_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let c = small_config();
    let table = ParamTable::new(&c);
    let params = table.init(&c, 5);
    save_pretrained(tmp.path(), &c, &params).unwrap();
    let (c2, p2, report) = load_pretrained(tmp.path(), 9).unwrap();
    assert_eq!(c2.to_hf_json(), c.to_hf_json());
    assert_eq!(p2, params);
    assert!(report.initialised.is_empty() && report.ignored.is_empty());
    let bytes = fs::read(tmp.path().join("model.safetensors")).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(meta.metadata().as_ref().unwrap().get("format").map(String::as_str), Some("pt"));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let names = st.names();
    assert!(
        names.contains(&"cls.predictions.bias")
            && names.contains(&"bert.encoder.layer.1.attention.self.key.weight")
    );
    assert!(!names.iter().any(|n| n.contains("decoder")));
    let config: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(tmp.path().join("config.json")).unwrap()).unwrap();
    assert_eq!(config["model_type"], "bert");
    assert_eq!(config["architectures"][0], "BertForPreTraining");
    assert_eq!(config["position_embedding_type"], "absolute");
}

/// Write a checkpoint whose tensors are the given (name, values) of `params` renamed by `rename`.
fn write_variant(
    dir: &Path,
    c: &ModelConfig,
    params: &[f32],
    rename: impl Fn(&str) -> Option<String>,
    extra: Vec<(String, Vec<usize>, Vec<f32>)>,
) {
    fs::create_dir_all(dir).unwrap();
    c.save(&dir.join("config.json")).unwrap();
    let table = ParamTable::new(c);
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = table
        .params
        .iter()
        .filter_map(|p| {
            rename(&p.name).map(|n| (n, p.shape.clone(), params[p.offset..p.offset + p.len].to_vec()))
        })
        .collect();
    tensors.extend(extra);
    bertcuda::infer::write_safetensors(&dir.join("model.safetensors"), &tensors).unwrap();
}

#[test]
fn loads_masked_lm_bare_model_and_legacy_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let c = small_config();
    let table = ParamTable::new(&c);
    let params = table.init(&c, 3);
    let (v, h) = (c.vocab_size, c.hidden_size);
    let word = table.get("bert.embeddings.word_embeddings.weight").unwrap();
    let bias = table.get("cls.predictions.bias").unwrap();

    // BertForMaskedLM: no pooler, no NSP head, decoder tensors present (bias only as decoder.bias).
    let mlm = tmp.path().join("mlm");
    write_variant(
        &mlm,
        &c,
        &params,
        |n| {
            (!n.starts_with("bert.pooler") && !n.starts_with("cls.seq") && n != "cls.predictions.bias")
                .then(|| n.to_string())
        },
        vec![
            (
                "cls.predictions.decoder.weight".into(),
                vec![v, h],
                params[word.offset..word.offset + word.len].to_vec(),
            ),
            (
                "cls.predictions.decoder.bias".into(),
                vec![v],
                params[bias.offset..bias.offset + bias.len].to_vec(),
            ),
            ("bert.embeddings.position_ids".into(), vec![1, 20], (0..20).map(|x| x as f32).collect()),
        ],
    );
    let (_, p, r) = load_pretrained(&mlm, 77).unwrap();
    assert_eq!(&p[bias.offset..bias.offset + bias.len], &params[bias.offset..bias.offset + bias.len]);
    let mut init: Vec<&str> = r.initialised.iter().map(String::as_str).collect();
    init.sort();
    assert_eq!(
        init,
        [
            "bert.pooler.dense.bias",
            "bert.pooler.dense.weight",
            "cls.seq_relationship.bias",
            "cls.seq_relationship.weight"
        ]
    );
    assert!(
        r.ignored.iter().any(|n| n.contains("decoder.weight"))
            && r.ignored.iter().any(|n| n.contains("position_ids"))
    );
    // No pooler in the checkpoint: embedding with it is refused, naming the alternatives.
    let model = LoadedModel::load(&mlm).unwrap();
    let tok = bertcuda::infer::model_tokenizer(&minilm_dir()).unwrap();
    let err =
        embed(bertcuda::backend::choice::Device::Cpu, &model, &tok, &["a".to_string()], Pooling::Pooler)
            .unwrap_err()
            .to_string();
    assert!(err.contains("no pooler") && err.contains("--pooling cls"), "{err}");

    // Bare BertModel with legacy LayerNorm names and no "bert." prefix.
    let bare = tmp.path().join("bare");
    write_variant(
        &bare,
        &c,
        &params,
        |n| {
            let n = n.strip_prefix("bert.")?;
            Some(n.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"))
        },
        vec![("classifier.weight".into(), vec![3, h], vec![0.0; 3 * h])],
    );
    let (_, p, r) = load_pretrained(&bare, 77).unwrap();
    for info in table.params.iter().filter(|i| i.name.starts_with("bert.")) {
        assert_eq!(
            &p[info.offset..info.offset + info.len],
            &params[info.offset..info.offset + info.len],
            "{}",
            info.name
        );
    }
    assert!(
        r.initialised.iter().all(|n| n.starts_with("cls.")) && r.initialised.len() == 7,
        "{:?}",
        r.initialised
    );
    assert_eq!(r.ignored, ["classifier.weight"]);
}

#[test]
fn bad_checkpoints_get_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let c = small_config();
    let table = ParamTable::new(&c);
    let params = table.init(&c, 3);
    let msg = |dir: &Path| load_pretrained(dir, 0).expect_err("an error").to_string();

    let wrong = tmp.path().join("wrong-shape");
    let mut bigger = c.clone();
    bigger.intermediate_size = 30;
    write_variant(&wrong, &c, &params, |n| Some(n.to_string()), vec![]);
    bigger.save(&wrong.join("config.json")).unwrap();
    let e = msg(&wrong);
    assert!(
        e.contains("bert.encoder.layer.0.intermediate.dense.bias")
            && e.contains("[24]")
            && e.contains("[30]"),
        "{e}"
    );

    let torch_only = tmp.path().join("torch");
    fs::create_dir_all(&torch_only).unwrap();
    fs::write(torch_only.join("pytorch_model.bin"), b"not really").unwrap();
    c.save(&torch_only.join("config.json")).unwrap();
    let e = msg(&torch_only);
    // Read natively now: a file that is no torch.save output is a one-line error naming it.
    assert!(e.contains("pytorch_model.bin") && e.contains("not a torch.save file"), "{e}");

    let truncated = tmp.path().join("truncated");
    write_variant(&truncated, &c, &params, |n| Some(n.to_string()), vec![]);
    let f = truncated.join("model.safetensors");
    let len = fs::metadata(&f).unwrap().len();
    fs::OpenOptions::new().write(true).open(&f).unwrap().set_len(len / 2).unwrap();
    let e = msg(&truncated);
    assert!(e.contains("model.safetensors") && e.contains("truncated or corrupt"), "{e}");

    let e = msg(&tmp.path().join("nowhere"));
    assert!(e.contains("nowhere") && e.contains("no such model directory"), "{e}");

    let bad_config = tmp.path().join("bad-config");
    write_variant(&bad_config, &c, &params, |n| Some(n.to_string()), vec![]);
    fs::write(bad_config.join("config.json"), r#"{"hidden_size": 10, "num_attention_heads": 3}"#).unwrap();
    let e = msg(&bad_config);
    assert!(e.contains("config.json") && e.contains("not divisible"), "{e}");
}

#[test]
fn configs_read_hf_fields_and_refuse_impossible_ones() {
    let c: ModelConfig =
        serde_json::from_str(r#"{"hidden_size": 64, "num_attention_heads": 4, "foo": 1}"#).unwrap();
    assert_eq!(c.position_embedding_type, "absolute");
    assert_eq!(c.layer_norm_eps, 1e-12);
    assert_eq!(c.extra["foo"], 1);
    for (json, want) in [
        (r#"{"hidden_size": 0}"#, "hidden_size is 0"),
        (r#"{"num_hidden_layers": 0}"#, "num_hidden_layers is 0"),
        (r#"{"hidden_act": "swish"}"#, "hidden_act"),
        (r#"{"position_embedding_type": "relative_key"}"#, "relative_key"),
    ] {
        let c: ModelConfig = serde_json::from_str(json).unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains(want), "{e}");
    }
    for p in bertcuda::model::config::PRESETS {
        let c = ModelConfig::preset(p, 30522).unwrap();
        c.validate().unwrap();
        assert_eq!(c.parameter_count(), ParamTable::new(&c).total as u128, "{p}");
    }
    assert_eq!(ModelConfig::preset("base", 30522).unwrap().parameter_count(), 110_106_428);
    assert!(ModelConfig::preset("huge", 10).is_err());
    // A size no machine holds is refused before anything is allocated (u128 arithmetic: no overflow).
    let mut c = small_config();
    c.hidden_size = 1 << 40;
    c.num_attention_heads = 1;
    let e = c.validate().unwrap_err().to_string();
    assert!(e.contains("parameters") && e.contains("choose smaller sizes"), "{e}");
}

fn run(args: &[&str]) -> (bool, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_bertcuda")).args(args).output().unwrap();
    (o.status.success(), String::from_utf8(o.stdout).unwrap(), String::from_utf8(o.stderr).unwrap())
}

#[test]
fn forward_prints_losses_and_dumps_outputs_and_gradients() {
    let tmp = tempfile::tempdir().unwrap();
    let c = small_config();
    let table = ParamTable::new(&c);
    save_pretrained(tmp.path(), &c, &table.init(&c, 1)).unwrap();
    let batch = tmp.path().join("batch.json");
    fs::write(
        &batch,
        r#"{"input_ids": [[2, 5, 7, 3, 9, 3], [2, 6, 3, 8, 3, 0]], "token_type_ids": [[0,0,0,0,1,1],[0,0,0,1,1,0]],
            "attention_mask": [[1,1,1,1,1,1],[1,1,1,1,1,0]], "labels": [[-100, 5, -100, -100, 9, -100], [-100, -100, -100, 8, -100, -100]],
            "next_sentence_label": [0, 1]}"#,
    )
    .unwrap();
    let dump = tmp.path().join("out.safetensors");
    let (m, b, d) = (tmp.path().to_str().unwrap(), batch.to_str().unwrap(), dump.to_str().unwrap());
    let (ok, out, err) = run(&["forward", "--model", m, "--batch", b, "--dump", d, "--grads"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let (loss, mlm, nsp) =
        (v["loss"].as_f64().unwrap(), v["mlm_loss"].as_f64().unwrap(), v["nsp_loss"].as_f64().unwrap());
    assert!((loss - mlm - nsp).abs() < 1e-6 && mlm > 2.0 && nsp > 0.3, "{v}");
    let bytes = fs::read(&dump).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let shapes: HashMap<String, Vec<usize>> =
        st.tensors().into_iter().map(|(n, t)| (n, t.shape().to_vec())).collect();
    assert_eq!(shapes["last_hidden_state"], [2, 6, 16]);
    assert_eq!(shapes["pooler_output"], [2, 16]);
    assert_eq!(shapes["prediction_logits"], [2, 6, 31]);
    assert_eq!(shapes["seq_relationship_logits"], [2, 2]);
    assert_eq!(shapes["grad.bert.encoder.layer.0.attention.self.query.weight"], [16, 16]);
    assert_eq!(shapes.keys().filter(|k| k.starts_with("grad.")).count(), table.params.len());

    // Without labels the losses are null.
    fs::write(&batch, r#"{"input_ids": [[2, 5, 3]]}"#).unwrap();
    let (ok, out, err) = run(&["forward", "--model", m, "--batch", b]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), r#"{"loss":null,"mlm_loss":null,"nsp_loss":null}"#);

    for (json, want) in [
        (r#"{"input_ids": [[2, 5, 3], [2, 3]]}"#, "every sequence must have 3"),
        (r#"{"input_ids": [[2, 500, 3]]}"#, "token id 500"),
        (r#"{"input_ids": [[2, 5, 3]], "next_sentence_label": [2]}"#, "next_sentence_label 2"),
        (r#"{"input_ids": [[2, 5, 3]], "labels": [[-100, 77, -100]]}"#, "MLM label 77"),
        (r#"{"inputs": [[2]]}"#, "batch.json"),
        (r#"{"input_ids": [[-1]]}"#, "negative"),
    ] {
        fs::write(&batch, json).unwrap();
        let (ok, _, err) = run(&["forward", "--model", m, "--batch", b]);
        assert!(!ok && err.contains(want) && !err.contains("panicked"), "{json}: {err}");
    }
}

#[test]
fn fill_mask_and_embed_on_a_real_checkpoint() {
    let dir = minilm_dir();
    let d = dir.to_str().unwrap();
    // A bare BertModel has no MLM head: fill-mask refuses rather than predict from random weights.
    let (ok, _, err) = run(&["fill-mask", "--model", d, "Paris is the [MASK] of France."]);
    assert!(!ok && err.contains("no MLM head") && !err.contains("panicked"), "{err}");
    // The same encoder saved as BertForPreTraining (heads initialised, then written) with its tokenizer.
    let tmp = tempfile::tempdir().unwrap();
    let (config, params, _) = load_pretrained(&dir, 0).unwrap();
    save_pretrained(tmp.path(), &config, &params).unwrap();
    for f in ["vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"] {
        fs::copy(dir.join(f), tmp.path().join(f)).unwrap();
    }
    let m = tmp.path().to_str().unwrap();
    let (ok, _, err) = run(&["fill-mask", "--model", m, "--top-k", "0", "a [MASK]"]);
    assert!(!ok && err.contains("--top-k 0"), "{err}");
    let (ok, out, err) = run(&["fill-mask", "--model", m, "--top-k", "3", "Paris is the [MASK] of France."]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["position"], 4);
    let preds = v["predictions"].as_array().unwrap();
    assert_eq!(preds.len(), 3);
    assert!(preds[0]["score"].as_f64().unwrap() >= preds[1]["score"].as_f64().unwrap());
    let (ok, _, err) = run(&["fill-mask", "--model", m, "no mask here"]);
    assert!(!ok && err.contains("[MASK]"), "{err}");

    let (ok, out, err) = run(&["embed", "--model", d, "--pooling", "mean", "one", "two three"]);
    assert!(ok, "{err}");
    let lines: Vec<Vec<f32>> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0].len(), 384);
}

#[test]
fn safetensors_bytes_cover_every_parameter_once() {
    let c = small_config();
    let table = ParamTable::new(&c);
    let bytes = safetensors_bytes(&table, &table.init(&c, 0)).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.names().len(), table.params.len());
    let total: usize = st.tensors().iter().map(|(_, t)| t.shape().iter().product::<usize>()).sum();
    assert_eq!(total, table.total);
}

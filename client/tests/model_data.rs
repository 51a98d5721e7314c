//! Data pipeline: file formats, packing, the validation split, shuffling and built-in corpora.

use std::collections::HashSet;
use std::io::Write;

use flate2::{Compression, write::GzEncoder};
use quorum_client::corpus::{Flavour, builtin_corpus};
use quorum_client::data::{BlockStream, DataError, TextSource, is_validation};
use quorum_client::tokenizer::Tokenizer;

fn docs(source: &TextSource) -> Vec<String> {
    source.documents().collect::<Result<_, _>>().unwrap()
}

#[test]
fn txt_jsonl_and_gz_are_parsed() {
    let dir = tempfile::tempdir().unwrap();
    let txt = dir.path().join("a.txt");
    std::fs::write(&txt, "first line\nsame doc\n\n\n  \nsecond doc\n\nthird").unwrap();
    assert_eq!(
        docs(&TextSource::open(txt.to_str().unwrap()).unwrap()),
        ["first line\nsame doc", "second doc", "third"]
    );

    let jsonl = dir.path().join("b.jsonl");
    std::fs::write(
        &jsonl,
        "{\"text\": \"one\", \"id\": 1}\n\n{\"text\": \"two\\nlines\"}\n",
    )
    .unwrap();
    assert_eq!(
        docs(&TextSource::open(jsonl.to_str().unwrap()).unwrap()),
        ["one", "two\nlines"]
    );

    let gz = dir.path().join("sub").join("c.jsonl.gz");
    std::fs::create_dir(gz.parent().unwrap()).unwrap();
    let mut enc = GzEncoder::new(std::fs::File::create(&gz).unwrap(), Compression::fast());
    enc.write_all(b"{\"text\": \"zipped\"}\n").unwrap();
    enc.finish().unwrap();
    assert_eq!(
        docs(&TextSource::open(gz.to_str().unwrap()).unwrap()),
        ["zipped"]
    );

    // A directory reads every supported file in path order (hidden files aside).
    std::fs::write(dir.path().join(".notes.csv"), "x").unwrap();
    let all = docs(&TextSource::open(dir.path().to_str().unwrap()).unwrap());
    assert_eq!(
        all,
        [
            "first line\nsame doc",
            "second doc",
            "third",
            "one",
            "two\nlines",
            "zipped"
        ]
    );
}

#[test]
fn bad_inputs_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"text\": \"ok\"}\n{\"body\": \"no text\"}\n").unwrap();
    let results: Vec<_> = TextSource::open(bad.to_str().unwrap())
        .unwrap()
        .documents()
        .collect();
    assert!(matches!(
        results[1],
        Err(DataError::BadJsonLine { line: 2, .. })
    ));
    let csv = dir.path().join("x.csv");
    std::fs::write(&csv, "a").unwrap();
    assert!(matches!(
        TextSource::open(csv.to_str().unwrap()),
        Err(DataError::UnsupportedFile(_))
    ));
    // In a folder too: a parquet file among text files is named, not skipped.
    let folder = dir.path().join("corpus");
    std::fs::create_dir(&folder).unwrap();
    std::fs::write(folder.join("notes.txt"), "text").unwrap();
    std::fs::write(folder.join("part-0.parquet"), "PAR1").unwrap();
    match TextSource::open(folder.to_str().unwrap()) {
        Err(e @ DataError::UnsupportedFile(_)) => {
            assert!(e.to_string().contains("part-0.parquet"), "{e}")
        }
        other => panic!("expected UnsupportedFile, got {:?}", other.map(|_| ())),
    }
    assert!(matches!(
        TextSource::open("builtin:poetry"),
        Err(DataError::Corpus(_))
    ));
    assert!(matches!(
        TextSource::open("builtin:legal:x"),
        Err(DataError::BadBuiltin { .. })
    ));
    assert!(TextSource::open(dir.path().join("missing.txt").to_str().unwrap()).is_err());
}

#[test]
fn blocks_have_fixed_length_and_eos_between_documents() {
    let source = TextSource::builtin(Flavour::Clinical, 1, 50_000);
    let mut stream =
        BlockStream::new(source.clone(), Tokenizer::Bytes, 31, 0).with_shuffle_buffer(1);
    let batch = stream.next_batch(4).unwrap();
    assert_eq!(batch.size(), vec![4, 32]);
    assert_eq!(batch.kind(), tch::Kind::Int64);
    // Without shuffling, the first block is the first training document's first 32 tokens.
    let first_train = docs(&source)
        .into_iter()
        .find(|d| !is_validation(d))
        .unwrap();
    let expected: Vec<i64> = first_train.bytes().take(32).map(i64::from).collect();
    assert_eq!(Vec::<i64>::try_from(batch.get(0)).unwrap(), expected);
    let mut eos = 0;
    for _ in 0..200 {
        let b = stream.next_block().unwrap();
        assert_eq!(b.len(), 32);
        assert!(b.iter().all(|&t| (0..258).contains(&t)));
        eos += b.iter().filter(|&&t| t == 257).count();
    }
    assert!(eos > 5, "documents should be separated by EOS");
}

#[test]
fn validation_split_is_disjoint_from_training() {
    let source = TextSource::builtin(Flavour::Finance, 2, 200_000);
    let all = docs(&source);
    let (val_docs, train_docs): (Vec<&String>, Vec<&String>) =
        all.iter().partition(|d| is_validation(d));
    let share = val_docs.len() as f64 / all.len() as f64;
    assert!((0.02..0.10).contains(&share), "validation share {share}");
    let as_text = |b: &[i64]| -> String {
        b.iter()
            .map(|&t| if t < 256 { t as u8 as char } else { '|' })
            .collect()
    };
    let mut stream = BlockStream::new(source, Tokenizer::Bytes, 1023, 3);
    let val_text: String = stream
        .validation_blocks(1000)
        .unwrap()
        .iter()
        .map(|b| as_text(b))
        .collect();
    assert!(val_text.starts_with(&format!("{}|", val_docs[0])));
    // Over a whole epoch, training blocks hold many complete training documents but never a
    // validation document.
    let mut whole_train_docs = 0;
    while stream.epoch() == 0 {
        let text = as_text(&stream.next_block().unwrap());
        assert!(
            val_docs.iter().all(|d| !text.contains(d.as_str())),
            "validation text in training"
        );
        whole_train_docs += text
            .split('|')
            .filter(|piece| train_docs.iter().any(|d| d == piece))
            .count();
    }
    assert!(
        whole_train_docs > 50,
        "only {whole_train_docs} complete documents seen"
    );
}

#[test]
fn shuffling_is_deterministic_per_seed_and_epochs_differ() {
    let make = |seed| {
        BlockStream::new(
            TextSource::builtin(Flavour::Legal, 0, 30_000),
            Tokenizer::Bytes,
            63,
            seed,
        )
        .with_shuffle_buffer(32)
    };
    let take = |s: &mut BlockStream, n| (0..n).map(|_| s.next_block().unwrap()).collect::<Vec<_>>();
    let (mut a, mut b, mut c) = (make(9), make(9), make(10));
    let (xa, xb, xc) = (take(&mut a, 50), take(&mut b, 50), take(&mut c, 50));
    assert_eq!(xa, xb);
    assert_ne!(xa, xc);
    // The same set of blocks makes up every epoch, in a different order.
    let mut s = make(9);
    let mut epochs: Vec<Vec<Vec<i64>>> = vec![Vec::new(), Vec::new()];
    loop {
        let block = s.next_block().unwrap();
        match epochs.get_mut(s.epoch() as usize) {
            Some(e) => e.push(block),
            None => break,
        }
    }
    let set0: HashSet<_> = epochs[0].iter().collect();
    let set1: HashSet<_> = epochs[1].iter().collect();
    assert_eq!(set0, set1);
    assert_ne!(epochs[0], epochs[1]);
}

#[test]
fn rewind_replays_the_same_blocks_across_epochs() {
    let mut s = BlockStream::new(
        TextSource::builtin(Flavour::Finance, 0, 20_000),
        Tokenizer::Bytes,
        63,
        4,
    )
    .with_shuffle_buffer(16);
    let take = |s: &mut BlockStream, n| (0..n).map(|_| s.next_block().unwrap()).collect::<Vec<_>>();
    take(&mut s, 40);
    let mark = s.position();
    assert_eq!(mark, 40);
    // Far enough to cross into later epochs, so the rewind must restore the epoch too.
    let first = take(&mut s, 600);
    assert!(s.epoch() > 0, "the test should cross an epoch boundary");
    s.rewind(mark).unwrap();
    assert_eq!((s.position(), s.epoch()), (mark, 0));
    assert_eq!(take(&mut s, 600), first);
}

#[test]
fn too_little_text_is_an_error_not_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let txt = dir.path().join("small.txt");
    std::fs::write(&txt, "tiny").unwrap();
    let mut s = BlockStream::new(
        TextSource::open(txt.to_str().unwrap()).unwrap(),
        Tokenizer::Bytes,
        64,
        0,
    );
    assert!(matches!(
        s.next_block(),
        Err(DataError::NoTrainingBlocks(_))
    ));
}

#[test]
fn builtin_corpora_are_deterministic_and_differ_between_flavours() {
    let hist = |text: &str| {
        let mut h = [0f64; 256];
        for b in text.bytes() {
            h[b as usize] += 1.0 / text.len() as f64;
        }
        h
    };
    let l1 =
        |a: &[f64; 256], b: &[f64; 256]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f64>();
    let texts: Vec<String> = Flavour::ALL
        .iter()
        .map(|&f| builtin_corpus(f, 4, 100_000))
        .collect();
    for (f, t) in Flavour::ALL.iter().zip(&texts) {
        assert_eq!(*t, builtin_corpus(*f, 4, 100_000));
        assert_ne!(*t, builtin_corpus(*f, 5, 100_000));
        assert_eq!(t.parse::<String>().unwrap().len(), 100_000);
    }
    let same_flavour = l1(
        &hist(&texts[0]),
        &hist(&builtin_corpus(Flavour::ALL[0], 99, 100_000)),
    );
    for i in 0..texts.len() {
        for j in i + 1..texts.len() {
            let d = l1(&hist(&texts[i]), &hist(&texts[j]));
            assert!(
                d > 5.0 * same_flavour,
                "flavours {i} and {j} too similar: {d} vs {same_flavour}"
            );
        }
    }
    // The shared part: every flavour contains sentences of the common grammar.
    assert!(texts.iter().all(|t| t.contains(" team ")));
}

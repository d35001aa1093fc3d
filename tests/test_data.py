"""PromptDataModule: sources, errors, deterministic shuffling, rank sharding, resumable loader."""

from __future__ import annotations

import pytest

from marble_lightning.data import PromptBatches, PromptDataModule, resolve_prompts

PROMPTS = [f"prompt {i}" for i in range(10)]


def test_sources(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("  a cat \n\nb dog\n   \nc\n", encoding="utf-8")
    assert resolve_prompts(str(path)) == ["a cat", "b dog", "c"]
    assert resolve_prompts(["x", "y"]) == ["x", "y"]
    from marble_lightning.toy.prompts import heldout_prompts, train_prompts

    assert resolve_prompts("toy:train") == train_prompts()
    assert resolve_prompts("toy:heldout") == heldout_prompts()
    assert resolve_prompts("toy:train:count") == train_prompts(["count"])
    assert not set(resolve_prompts("toy:train")) & set(resolve_prompts("toy:heldout"))


def test_errors_name_the_offending_value(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty.txt"):
        resolve_prompts(str(empty))
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        resolve_prompts(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="'validation'"):
        resolve_prompts("toy:validation")
    with pytest.raises(ValueError, match="empty"):
        resolve_prompts([])
    with pytest.raises(ValueError, match="3"):
        resolve_prompts(["a", 3])
    with pytest.raises(ValueError, match="prompts_per_step"):
        PromptDataModule(["a"], prompts_per_step=0)
    with pytest.raises(ValueError, match="num_workers"):
        PromptDataModule(["a"], num_workers=-1)
    with pytest.raises(ValueError, match="global batch"):
        PromptBatches(["a", "b", "c"], prompts_per_step=2, seed=0, rank=0, world_size=2)


def test_sources_are_resolved_lazily(tmp_path):
    path = tmp_path / "later.txt"
    dm = PromptDataModule(str(path), prompts_per_step=2, heldout_prompts="toy:heldout")
    path.write_text("a\nb\nc\n", encoding="utf-8")  # written after construction
    dm.setup("fit")
    assert dm.train == ["a", "b", "c"]
    assert dm.heldout is not None and len(dm.heldout) > 0


def test_epochs_are_deterministic_permutations():
    data = PromptBatches(PROMPTS, prompts_per_step=3, seed=4)
    assert len(data) == 3  # 10 // 3, remainder dropped
    data.epoch = 0
    epoch0 = list(data)
    assert epoch0 == list(data)  # same epoch, same order
    assert all(len(b) == 3 for b in epoch0)
    flat = [p for b in epoch0 for p in b]
    assert len(set(flat)) == 9 and set(flat) <= set(PROMPTS)
    data.epoch = 1
    assert list(data) != epoch0
    assert [data.batch(0, i) for i in range(3)] == epoch0
    other_seed = PromptBatches(PROMPTS, prompts_per_step=3, seed=5)
    assert list(other_seed) != epoch0


def test_ranks_split_the_single_process_batch():
    for epoch in range(3):
        single = PromptBatches(PROMPTS, prompts_per_step=4, seed=1)
        ranks = [
            PromptBatches(PROMPTS, prompts_per_step=2, seed=1, rank=r, world_size=2)
            for r in range(2)
        ]
        for d in (single, *ranks):
            d.epoch = epoch
        for whole, part0, part1 in zip(list(single), list(ranks[0]), list(ranks[1])):
            assert whole == part0 + part1  # disjoint, and in the single-process order
        assert len(single) == len(ranks[0]) == 2


def test_resumable_loader_skips_processed_batches():
    dm = PromptDataModule(PROMPTS, prompts_per_step=2, seed=3)
    loader = dm.train_dataloader()
    full = list(loader)
    assert len(full) == 5 and all(isinstance(b, list) for b in full)
    loader.load_state_dict({"batches_consumed": 3})
    assert list(loader) == full[3:]
    assert list(loader) == full  # the restored position applies to one pass only
    # batch g of the stream is batch g % 5 of data epoch g // 5
    loader.load_state_dict({"batches_consumed": 7})
    epoch1 = [dm.train_dataloader().dataset.batch(1, i) for i in range(5)]
    assert list(loader) == epoch1[2:] and epoch1 != full
    # checkpoints of the earlier (epoch, batches done in it) format still resume
    loader.load_state_dict({"epoch": 1, "batches_done": 2})
    assert list(loader) == epoch1[2:]
    assert loader.state_dict() == {"batches_consumed": 0}


def test_workers_yield_the_same_stream():
    dm = PromptDataModule(PROMPTS, prompts_per_step=2, seed=3)
    single = list(dm.train_dataloader())
    dm_workers = PromptDataModule(PROMPTS, prompts_per_step=2, seed=3, num_workers=2)
    assert list(dm_workers.train_dataloader()) == single


STRATA = {"shapes": [f"shape {i}" for i in range(9)], "text": [f"text {i}" for i in range(5)]}


def test_strata_give_fixed_counts_per_batch():
    data = PromptBatches(STRATA, {"shapes": 3, "text": 1}, seed=2)
    assert len(data) == 3  # min(9 // 3, 5 // 1)
    for epoch in range(4):
        data.epoch = epoch
        batches = list(data)
        assert len(batches) == 3
        for b in batches:
            assert [p.split()[0] for p in b] == ["shape"] * 3 + ["text"]
        shapes = [p for b in batches for p in b[:3]]
        assert sorted(shapes) == sorted(STRATA["shapes"])  # every shape prompt once per epoch
        texts = [b[3] for b in batches]
        assert len(set(texts)) == 3
    # one stratum reproduces the unstratified stream exactly
    plain = PromptBatches(PROMPTS, prompts_per_step=3, seed=4)
    one = PromptBatches({"all": PROMPTS}, {"all": 3}, seed=4)
    assert list(plain) == list(one)


def test_strata_ranks_split_the_single_process_batch():
    single = PromptBatches(STRATA, {"shapes": 4, "text": 2}, seed=1)
    ranks = [
        PromptBatches(STRATA, {"shapes": 2, "text": 1}, seed=1, rank=r, world_size=2)
        for r in range(2)
    ]
    for whole, part0, part1 in zip(list(single), list(ranks[0]), list(ranks[1])):
        assert sorted(whole) == sorted(part0 + part1) and not set(part0) & set(part1)


def test_strata_datamodule_and_errors():
    dm = PromptDataModule(
        {"shapes": "toy:train:count,relation", "text": "toy:train:text"}, {"shapes": 2, "text": 2}
    )
    dm.setup("fit")
    from marble_lightning.toy.prompts import parse_prompt

    batch = next(iter(dm.train_dataloader()))
    assert [parse_prompt(p).family == "text" for p in batch] == [False, False, True, True]
    assert sorted(dm.train) == sorted(resolve_prompts("toy:train"))
    with pytest.raises(ValueError, match="keys"):
        PromptDataModule({"a": ["x"], "b": ["y"]}, {"a": 1})
    with pytest.raises(ValueError, match="mapping"):
        PromptDataModule({"a": ["x"]}, 1)
    with pytest.raises(ValueError, match="mapping"):
        PromptDataModule(["x"], {"a": 1})
    with pytest.raises(ValueError, match=r"prompts_per_step\['a'\]"):
        PromptDataModule({"a": ["x"]}, {"a": 0})
    with pytest.raises(ValueError, match="stratum 'b'"):
        PromptBatches({"a": ["x", "y"], "b": ["z"]}, {"a": 1, "b": 2}, seed=0)
    bad = PromptDataModule({"text": "toy:nope"}, {"text": 1})
    with pytest.raises(ValueError, match=r"train_prompts\['text'\]"):
        bad.setup("fit")


def test_heldout_prompt_files_and_records(tmp_path):
    import json

    from marble_lightning.data import EvaluationPrompts, resolve_prompt_records
    from marble_lightning.toy.prompts import heldout_prompts

    meta = {"tag": "counting", "prompt": "two dogs", "include": [{"class": "dog", "count": 2}]}
    jsonl = tmp_path / "geneval.jsonl"
    jsonl.write_text(json.dumps(meta) + "\n", encoding="utf-8")
    txt = tmp_path / "list.txt"
    txt.write_text("# comment\na cat\n", encoding="utf-8")
    records = resolve_prompt_records(["inline", str(jsonl), txt, "toy:heldout:count"])
    toy = heldout_prompts(["count"])
    assert [r.prompt for r in records] == ["inline", "two dogs", "a cat", *toy]
    assert [r.source for r in records[:3]] == ["", "geneval.jsonl", "list.txt"]
    assert records[1].tag == "counting" and records[2].metadata is None
    assert [r.prompt for r in resolve_prompt_records(str(jsonl))] == ["two dogs"]
    dm = PromptDataModule("toy:train", heldout_prompts=[str(jsonl), "x"], eval_images_per_prompt=2)
    assert dm.heldout == ["two dogs", "x"] and dm.heldout_records[0].metadata == meta
    batches = list(EvaluationPrompts(dm.heldout_records, 2, 10, batch_size=3, rank=1, world=2))
    assert batches == [
        {
            "prompts": ["two dogs", "x"], "seeds": [11, 11], "sources": ["geneval.jsonl", ""],
            "tags": ["counting", ""], "metadata": [meta, None], "indices": [0, 1],
        }
    ]  # fmt: skip
    plain = next(iter(EvaluationPrompts(["a", "b"], 1, 0, batch_size=4)))
    assert plain["prompts"] == ["a", "b"] and plain["sources"] == ["", ""]

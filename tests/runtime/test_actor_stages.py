"""EncoderActor's overlapping stages: with work split into ``encode`` and ``commit``, shard N is written on
the commit thread while shard N+1 (the look-ahead) is encoded, and every result is still the one its own
call would give. The actor class runs in this process (no Ray), on the real tiny model."""

from __future__ import annotations

import threading
import time

import pytest

from pipeline.runtime.actors import EncoderActor
from tests.support.tiny_models import build_tiny_model


@pytest.fixture(scope="module")
def actor(tmp_path_factory: pytest.TempPathFactory) -> EncoderActor:
    model = build_tiny_model(tmp_path_factory.mktemp("stages") / "tiny")
    return EncoderActor(str(model), {"device": "cpu"}, threads=1)


class RecordingWork:
    """Texts per item; ``commit`` takes ``commit_seconds``; every stage's (start, end, thread) is recorded."""

    def __init__(
        self, texts: dict[int, list[str]], commit_seconds: float, fail_encode: set[int] = frozenset()
    ):
        self.texts, self.commit_seconds, self.fail_encode = texts, commit_seconds, set(fail_encode)
        self.events: list[tuple[str, int, float, float, str]] = []
        self.lock = threading.Lock()

    def record(self, stage: str, item: int, started: float) -> None:
        with self.lock:
            self.events.append((stage, item, started, time.perf_counter(), threading.current_thread().name))

    def load(self, encoder, item: int):
        return encoder.tokenize(self.texts[item])

    def encode(self, encoder, item: int, loaded):
        started = time.perf_counter()
        if item in self.fail_encode:
            self.fail_encode.discard(item)  # fails once: as a transient device error would
            raise RuntimeError(f"encode {item} failed")
        vectors = encoder.encode_tokens(loaded)
        self.record("encode", item, started)
        return vectors

    def commit(self, encoder, item: int, encoded, attempt: int) -> dict:
        started = time.perf_counter()
        time.sleep(self.commit_seconds)
        self.record("commit", item, started)
        return {"item": item, "rows": len(encoded), "first": encoded[0].tolist(), "attempt": attempt}

    def process(self, encoder, item: int, loaded, attempt: int) -> dict:
        return self.commit(encoder, item, self.encode(encoder, item, loaded), attempt)


def texts_for(n: int) -> dict[int, list[str]]:
    return {i: [f"shard {i} text {j} " + "word " * (j % 7) for j in range(40)] for i in range(n)}


def run_all(actor: EncoderActor, work: RecordingWork, n: int) -> list[dict]:
    results = []
    for i in range(n):
        lookahead = (i + 1, i + 1) if i + 1 < n else None
        results.append(actor.run(work, i, i, 1, lookahead))
    return results


def test_next_shard_is_encoded_while_this_one_commits(actor: EncoderActor) -> None:
    work = RecordingWork(texts_for(4), commit_seconds=0.4)
    results = run_all(actor, work, 4)
    expected = [actor.encoder.encode(work.texts[i])[0].tolist() for i in range(4)]
    assert [r["first"] for r in results] == expected and [r["item"] for r in results] == [0, 1, 2, 3]
    spans = {(stage, item): (start, end, thread) for stage, item, start, end, thread in work.events}
    assert sorted(item for stage, item in spans if stage == "encode") == [0, 1, 2, 3]  # each encoded once
    for i in range(3):
        commit_start, commit_end, commit_thread = spans[("commit", i)]
        encode_start, encode_end, encode_thread = spans[("encode", i + 1)]
        assert commit_thread.startswith("commit") and not encode_thread.startswith("commit")
        # The two overlap in time (either may be the first to get going).
        assert max(commit_start, encode_start) < min(commit_end, encode_end), (
            f"shard {i + 1} was not encoded during shard {i}'s commit"
        )


def test_a_failed_encode_ahead_is_redone_by_its_own_call(actor: EncoderActor) -> None:
    work = RecordingWork(texts_for(3), commit_seconds=0.05, fail_encode={1})
    results = run_all(actor, work, 3)
    assert [r["item"] for r in results] == [0, 1, 2]
    assert results[1]["first"] == actor.encoder.encode(work.texts[1])[0].tolist()

"""Shards read through WebDataset's URL layer: an HTTP server on 127.0.0.1 and a ``pipe:`` command give the
same batches as the local folder, resume exactly, and a failing server gives retries, then a clear error."""

from __future__ import annotations

import functools
import json
import logging
import shlex
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from edlm_dist.config.schema import SyntheticConfig
from edlm_dist.data.loader import build_eval_loader, build_train_loader
from edlm_dist.data.locations import DataLocation, RetryPolicy
from edlm_dist.data.prepare import prepare_data
from edlm_dist.data.shards import load_manifest, validate_dataset
from edlm_dist.errors import ConfigError, DataError

CFG = SyntheticConfig(num_tokens=30, num_topics=2, branching=20, concentration=5.0, train_rows=47, valid_rows=23)
FAST = RetryPolicy(retries=2, delay_s=0.01)
TRAIN = dict(micro_batch=3, dp_rank=1, dp_world=2, seed=11, shuffle_buffer=5)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    prepare_data("synthetic", out, seq_len=12, shard_rows=10, seed=3, synthetic_cfg=CFG, progress=False)
    return out


class Server:
    """``http.server`` on 127.0.0.1 in a thread; ``cut`` = file names whose next response stops half-way."""

    def __init__(self, root: Path):
        self.cut: set[str] = set()
        self.requests: list[str] = []
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output clean
                pass

            def copyfile(self, source, outputfile):
                name = self.path.lstrip("/")
                server.requests.append(name)
                if name in server.cut:  # Content-Length promises the whole file; send 4 of 10 rows, hang up
                    server.cut.discard(name)
                    outputfile.write(source.read()[: 4 * 1024 + 100])
                    self.close_connection = True
                    return
                super().copyfile(source, outputfile)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def server(data_dir):
    running = Server(data_dir)
    yield running
    running.stop()


def take(loader, n: int) -> list[torch.Tensor]:
    it = iter(loader)
    return [next(it) for _ in range(n)]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def pipe_url(data_dir: Path) -> str:
    return f"pipe:cat {shlex.quote(str(data_dir))}/{{}}"


def test_http_and_pipe_give_the_local_batches(data_dir, server):
    for remote in (server.url, pipe_url(data_dir)):
        assert load_manifest(remote) == load_manifest(data_dir)
        validate_dataset(remote, seq_len=12, vocab_size=33, retry=FAST)
        local = take(build_train_loader(data_dir, **TRAIN), 20)  # 60 rows of a 23-24 row stream: 2+ epochs
        assert same(take(build_train_loader(remote, retry=FAST, **TRAIN), 20), local)
        for workers in (0, 2):
            assert same(list(build_eval_loader(remote, micro_batch=4, num_workers=workers, retry=FAST)),
                        list(build_eval_loader(data_dir, micro_batch=4, num_workers=workers)))


@pytest.mark.parametrize("num_workers, stop", [(0, 7), (2, 8)])
def test_exact_resume_over_http(data_dir, server, num_workers, stop):
    kwargs = dict(TRAIN, num_workers=num_workers)
    reference = take(build_train_loader(data_dir, **kwargs), 20)
    first = build_train_loader(server.url, retry=FAST, **kwargs)
    assert same(take(first, stop), reference[:stop])
    state = json.loads(json.dumps(first.state_dict()))
    resumed = build_train_loader(server.url, retry=FAST, **kwargs)
    resumed.load_state_dict(state)
    assert same(take(resumed, 20 - stop), reference[stop:])


def test_a_transfer_cut_short_is_retried_at_the_row_it_reached(data_dir, server, caplog):
    reference = list(build_eval_loader(data_dir, micro_batch=4))
    server.cut = {"valid/shard-000001.tar"}
    with caplog.at_level(logging.WARNING, logger="edlm_dist.data.locations"):
        assert same(list(build_eval_loader(server.url, micro_batch=4, retry=FAST)), reference)
    assert server.requests.count("valid/shard-000001.tar") == 2
    assert any("retry 1 of 2" in r.getMessage() and "valid/shard-000001.tar" in r.getMessage() for r in caplog.records)


def test_a_server_that_dies_mid_epoch_gives_retries_then_a_clear_error(data_dir, caplog):
    server = Server(data_dir)
    loader = iter(build_train_loader(server.url, retry=FAST, micro_batch=3, seed=11, shuffle_buffer=0))
    first = [next(loader) for _ in range(2)]  # 6 of 47 rows: still inside the first shard
    assert same(first, take(build_train_loader(data_dir, micro_batch=3, seed=11, shuffle_buffer=0), 2))
    server.stop()
    with caplog.at_level(logging.WARNING, logger="edlm_dist.data.locations"), \
            pytest.raises(DataError, match=r"cannot read http://127\.0\.0\.1:\d+/train/shard-\d+\.tar after 3 "
                                           r"attempts .*check that the server or command is reachable") as info:
        for _ in range(20):
            next(loader)
    assert "\n" not in str(info.value)
    retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert len(retries) == 2 and "retry 2 of 2" in retries[-1]


def test_remote_dataset_errors(tmp_path, data_dir, server):
    with pytest.raises(DataError, match=r"cannot read pipe:cat .*nowhere/manifest\.json after 2 attempts"):
        load_manifest(f"pipe:cat {tmp_path}/nowhere/{{}}", RetryPolicy(retries=1, delay_s=0.0))
    with pytest.raises(DataError, match=r"/missing/manifest\.json after 1 attempt "):
        load_manifest(server.url + "/missing", RetryPolicy(retries=0))
    with pytest.raises(ConfigError, match=r"pipe: command without \{\}"):
        DataLocation(f"pipe:cat {data_dir}/manifest.json")

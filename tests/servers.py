"""The bundled model's engine and an in-process server for tests (shared through fixtures in conftest.py)."""

from __future__ import annotations

import socket
import threading
import time

import torch

from expertyard.engine.llm_engine import EngineConfig, LLMEngine
from expertyard.entrypoints.common import bundled_model_path, load_tokenizer
from expertyard.loader import load_model

KEY = "test-key"
MAX_MODEL_LEN = 256


def make_engine(max_num_seqs: int = 8, max_model_len: int = MAX_MODEL_LEN, async_scheduling: bool = False,
                path=None) -> LLMEngine:
    path = path or bundled_model_path()
    return LLMEngine(load_model(path, "cpu", torch.float32, progress=False), load_tokenizer(path),
                     EngineConfig(max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                                  async_scheduling=async_scheduling))


class RunningServer:
    """uvicorn in a thread, on a free loopback port."""

    def __init__(self, engine: LLMEngine, api_key: str | None = KEY, max_body_bytes: int = 64 * 1024):
        import uvicorn

        from expertyard.server import build_app

        self.engine, self.api_key = engine, api_key
        self.app = build_app(engine, "tiny-moe", api_key=api_key, max_body_bytes=max_body_bytes)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()

    def idle(self, timeout: float = 10.0) -> bool:
        """True once the engine holds no sequence (waits for aborts to reach the engine thread)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if not self.engine.scheduler.running and not self.engine.scheduler.waiting:
                return True
            time.sleep(0.02)
        return False


# a ChatML template that shows the model its tools (Hermes / Qwen style), for tool_choice auto
TOOL_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nYou may call these functions:\n<tools>\n{%- for tool in tools %}\n"
    "{{ tool | tojson }}{%- endfor %}\n</tools>\nCall one as <tool_call>\n{\"name\": NAME, \"arguments\": ARGS}\n"
    "</tool_call><|im_end|>\n{% endif %}"
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def tool_template_model(folder) -> object:
    """The bundled model's files linked into `folder`, with TOOL_TEMPLATE as its chat template."""
    for f in bundled_model_path().iterdir():
        if f.name != "chat_template.jinja":
            (folder / f.name).symlink_to(f)
    (folder / "chat_template.jinja").write_text(TOOL_TEMPLATE)
    return folder

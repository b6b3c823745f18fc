"""The OpenAI-compatible HTTP front end: one more client of the coordinator.

- ``app``: the FastAPI app and its routes (``create_app``);
- ``state``, ``errors``, ``inference``: what the routes share, OpenAI-shaped errors, serving one
  request (unary or server-sent events);
- ``openai_protocol``, ``bounds``: request models (strict, every bound a field constraint) and
  their mapping to ``SamplingParams``; a served model's bounds (name, vocabulary, context);
- ``choices``: a request's engine requests (context check, best_of) and its answer's choices;
- ``responses``, ``logprobs``, ``stop_strings``: answer bodies and stream chunks, log-probs
  (echo, top-N, vLLM's prompt_logprobs), stop strings;
- ``schemas``, ``openapi_doc``: the answers' models and the OpenAPI document built from them;
- ``tokenize``: vLLM's /tokenize and /detokenize;
- ``chat_template``, ``generation``: chat prompts, one choice's generation through the
  coordinator;
- ``metrics``: Prometheus metrics; ``runner``: uvicorn in this thread, a thread or a process;
  ``workers``: N worker processes behind one port (``--http-workers``), supervised;
  ``cli``: ``python -m megatron_coord.serving``.
"""

from .app import create_app
from .runner import HTTPServerProcess, HTTPServerThread, bind_socket, serve_http
from .state import DEFAULT_MODEL_NAME, ServerOptions
from .workers import HTTPWorkerPool, worker_count

__all__ = [
    "DEFAULT_MODEL_NAME",
    "HTTPServerProcess",
    "HTTPServerThread",
    "HTTPWorkerPool",
    "ServerOptions",
    "bind_socket",
    "create_app",
    "serve_http",
    "worker_count",
]

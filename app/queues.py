"""What the API and the worker agree on: the task's name, its queue, and the Celery client built from settings.

The API sends tasks and the worker consumes them; both import this module, so neither imports the
other (``worker`` may import ``app``; ``app`` never imports ``worker``). Importing it does not
import Celery: the log filter in ``clipguard.app.logs`` only needs the task's name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from celery import Celery
    from clipguard.app.settings import Settings

PURIFY_TASK = "clipguard.worker.tasks.purify"
GPU_QUEUE = "gpu"


def worker_args(name: str) -> list[str]:
    """``celery`` arguments for one worker consuming the job queue, one job at a time; ``name`` is its node name."""
    return [
        "-A",
        "clipguard.worker.celery_app:celery_app",
        "worker",
        "-Q",
        GPU_QUEUE,
        "-c",
        "1",
        "-P",
        "prefork",
        "--loglevel",
        "INFO",
        "-n",
        name,
    ]


TASK_MODULES = ["clipguard.worker.tasks"]
"""Imported by the worker process when it starts (by name: the API never imports them)."""


def make_celery(settings: Settings) -> Celery:
    """The Celery application: broker from ``CLIPGUARD_BROKER_URL``, reliability settings for long GPU jobs.

    The job row in the SQL store is the source of truth; there is no result backend.
    """
    from celery import Celery
    from kombu import Queue

    hard = settings.job_time_limit_s
    # Redis redelivers an unacked message after visibility_timeout: it must outlast the hard
    # limit or a healthy long job would run twice (Celery docs, redis.rst "Caveats").
    redis = settings.broker_url.startswith(("redis", "rediss", "sentinel"))
    # (only Redis-like transports take the option; the SQLAlchemy one passes it to create_engine)
    transport = {"visibility_timeout": hard + 3600} if redis else {}
    app = Celery("clipguard", broker=settings.broker_url, include=TASK_MODULES)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_backend=None,
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_max_tasks_per_child=1,
        task_time_limit=hard,
        task_soft_time_limit=max(hard - 300, int(hard * 0.9)),
        broker_transport_options=transport,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        task_queues=[Queue(GPU_QUEUE)],
        task_default_queue=GPU_QUEUE,
        task_routes={PURIFY_TASK: {"queue": GPU_QUEUE}},
        task_create_missing_queues=False,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        # Task events for Flower and `celery events`: the worker sends received/started/succeeded/failed
        # (what `-E` does), the API's publish sends task-sent.
        worker_send_task_events=True,
        task_send_sent_event=True,
    )
    return app

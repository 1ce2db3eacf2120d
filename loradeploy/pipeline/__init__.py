"""Plan which stages run for which models, then execute them with resume, retries and records."""
from .outcomes import ModelOutcome, PipelineResult, Reporter, StageOutcome  # noqa: F401
from .plan import NEEDS, PHASES, model_paths, plan_stages  # noqa: F401
from .run import make_notifier, run_pipeline  # noqa: F401

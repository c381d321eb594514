"""The one error tree, and the one place where Tencent error codes get their policy.

Every error says whether it is retried (`retryable`) and whether a retry spends the
job's failure budget (`spends_budget`). Messages never carry personal data or secrets.
"""

from __future__ import annotations

from typing import Any, ClassVar


class MacaoOcrError(Exception):
    """Root of every error this project raises on purpose."""

    retryable: ClassVar[bool] = False
    spends_budget: ClassVar[bool] = True
    kind: ClassVar[str] = "error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or type(self).__name__

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class ConfigError(MacaoOcrError):
    """Settings are missing or invalid; raised at start, never retried."""

    kind = "config"


class DeploymentError(MacaoOcrError):
    """A service this process needs is out of reach or not ready (database down or not
    migrated, Redis down); raised at start, never retried. `fix` says what to run."""

    kind = "deployment"

    def __init__(self, message: str, *, code: str, fix: str | None = None) -> None:
        super().__init__(message, code=code)
        self.fix = fix


class InputError(MacaoOcrError):
    """Pre-flight rejection: the input breaks a documented rule, so no API call is made."""

    kind = "input"

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(message, code=f"Input.{rule}")
        self.rule = rule


class NotFoundError(MacaoOcrError):
    """A job, batch or image the caller named does not exist (for this tenant)."""

    kind = "not_found"


class ReplayRefused(MacaoOcrError):
    """This job may not be replayed now (its code says why): in flight, succeeded without
    force, its images deleted by retention (`Replay.ImagesDeleted`), or erased
    (`Replay.Erased`). Never retried; no API call is made."""

    kind = "replay_refused"

    def __init__(self, message: str, *, code: str = "Replay.Refused") -> None:
        super().__init__(message, code=code)


class ErasedError(MacaoOcrError):
    """The job was erased on request (`macao-ocr erase`): its personal data is deleted and
    it is never called for again. A queued or retrying job erased ends `failed` with this
    code. Never retried, never replayable."""

    kind = "erased"
    CODE: ClassVar[str] = "Internal.Erased"

    def __init__(self) -> None:
        super().__init__(
            "erased on request: its personal data is deleted and it is never called for again",
            code=self.CODE,
        )


class StoreFailed(MacaoOcrError):
    """The API answered but its answer could not be decoded or stored.

    Never retried (a retry would buy the job again): the job fails at once with
    `Internal.StoreFailed`, the answer is kept (`kept_answer`), and `macao-ocr replay`
    stores it without a new call once the fault is fixed. `reason` is the exception's type,
    never its text (which may carry the values)."""

    kind = "store_failed"
    CODE: ClassVar[str] = "Internal.StoreFailed"

    def __init__(self, stage: str, reason: str) -> None:
        super().__init__(
            f"the API's answer could not be {stage}d ({reason}); the answer is kept: "
            "`macao-ocr replay` stores it without a new call once fixed",
            code=self.CODE,
        )
        self.stage = stage
        self.reason = reason


class AnswerUndecodable(StoreFailed):
    """The client could not turn a success answer into a result. Carries the `Response`
    object for the pipeline to keep; it is in no message, repr or log."""

    def __init__(self, reason: str, answer: dict[str, Any]) -> None:
        super().__init__("decode", reason)
        self.answer = answer


class WorkerLostError(MacaoOcrError):
    """A job's attempts ended with its worker lost `max_worker_lost` times (killed, out of
    memory, a crash): it fails as `Internal.WorkerLost` instead of cycling. Replayable."""

    kind = "worker_lost"
    CODE: ClassVar[str] = "Internal.WorkerLost"

    def __init__(self, lost: int) -> None:
        super().__init__(
            f"{lost} attempts ended with the worker lost (killed, out of memory or crashed); "
            "replay once the cause is fixed",
            code=self.CODE,
        )


class WebhookUrlRefused(MacaoOcrError):
    """A webhook URL leads to a non-public address (checked at every connection). Retried
    within the delivery's window: DNS may be fixed, or the policy relaxed."""

    retryable = True
    spends_budget = False
    kind = "webhook_url"


class StateUnavailable(MacaoOcrError):
    """Redis (limiter, circuit) cannot be reached. We fail closed: wait, never call blind."""

    retryable = True
    spends_budget = False
    kind = "state_unavailable"


class ApiError(MacaoOcrError):
    """An answer (or a failed exchange) from the OCR endpoint."""

    def __init__(
        self, code: str, message: str, *, request_id: str | None = None, http_status: int = 200
    ) -> None:
        super().__init__(message, code=code)
        self.request_id = request_id
        self.http_status = http_status


class ThrottledError(ApiError):
    """The account's request rate was exceeded: slow the shared limiter, reschedule."""

    retryable = True
    spends_budget = False
    kind = "throttled"


class TransientError(ApiError):
    """Worth retrying with backoff; spends the job's budget."""

    retryable = True
    kind = "transient"


class TransportError(TransientError):
    """Non-200 status, reset connection, timeout: no Tencent envelope to read."""

    kind = "transport"


class UnknownCodeError(TransientError):
    """A code the reference does not list: retried on a small budget, and logged."""

    kind = "unknown"


class ResignError(ApiError):
    """Timestamp refused: sign again with a fresh timestamp, once; repeated means clock skew."""

    retryable = True
    spends_budget = False
    kind = "resign"


class AccountError(ApiError):
    """Every job would fail the same way: pause all calls, keep jobs queued, alert."""

    retryable = True
    spends_budget = False
    kind = "account"


class PermanentError(ApiError):
    """The job's own input is at fault: fail it at once, replayable later."""

    kind = "permanent"


THROTTLED_CODES = frozenset(
    {
        "RequestLimitExceeded",
        "RequestLimitExceeded.UinLimitExceeded",
        "RequestLimitExceeded.GlobalRegionUinLimitExceeded",
        "RequestLimitExceeded.IPLimitExceeded",
    }
)
TRANSIENT_CODES = frozenset(
    {
        "FailedOperation.DownLoadError",
        "FailedOperation.OcrFailed",
        "FailedOperation.UnKnowError",
        "FailedOperation.WarningServiceFailed",
        "FailedOperation.EngineRecognizeTimeout",
        "ResourceUnavailable.ImageDownloadError",
        "InternalError",
        "ServiceUnavailable",
        "ResourceInsufficient",
    }
)
RESIGN_CODES = frozenset({"AuthFailure.SignatureExpire"})
ACCOUNT_CODES = frozenset(
    {
        "FailedOperation.UnOpenError",
        "AuthFailure.SecretIdNotFound",
        "AuthFailure.InvalidSecretId",
        "AuthFailure.SignatureFailure",
        "AuthFailure.UnauthorizedOperation",
        "AuthFailure.TokenFailure",
        "UnauthorizedOperation",
        "ResourceUnavailable.InArrears",
        "ResourceUnavailable.ResourcePackageRunOut",
        "ResourcesSoldOut.ChargeStatusException",
        "IpInBlacklist",
        "IpNotInWhitelist",
        "ActionOffline",
        "LimitExceeded",
        # Not in the reference's table: gateway answers to a malformed call (our client or
        # our configuration is wrong), which every job would meet alike.
        "AuthFailure.InvalidAuthorization",
        "AuthFailure.MFAFailure",
        "InvalidAction",
        "NoSuchVersion",
        "UnsupportedProtocol",
        "UnsupportedRegion",
        "InvalidRegion",
    }
)
PERMANENT_CODES = frozenset(
    {
        "FailedOperation.EmptyImageError",
        "FailedOperation.ImageDecodeFailed",
        "FailedOperation.ImageNoSpecifiedCard",
        "InvalidParameter.ConfigFormatError",
        "InvalidParameterValue.InvalidParameterValueLimit",
        "LimitExceeded.TooLargeFileError",
        "RequestSizeLimitExceeded",
        "MissingParameter",
        "UnknownParameter",
    }
)
# `InvalidParameter*` in the reference: any code in these families is the input's fault.
PERMANENT_PREFIXES = ("InvalidParameter",)
THROTTLED_PREFIXES = ("RequestLimitExceeded.",)

POLICY: dict[str, type[ApiError]] = {
    **dict.fromkeys(THROTTLED_CODES, ThrottledError),
    **dict.fromkeys(TRANSIENT_CODES, TransientError),
    **dict.fromkeys(RESIGN_CODES, ResignError),
    **dict.fromkeys(ACCOUNT_CODES, AccountError),
    **dict.fromkeys(PERMANENT_CODES, PermanentError),
}


def classify(code: str) -> type[ApiError]:
    """The policy class for a Tencent error code (unknown codes: transient, small budget)."""
    exact = POLICY.get(code)
    if exact is not None:
        return exact
    if code.startswith(THROTTLED_PREFIXES):
        return ThrottledError
    if code.startswith(PERMANENT_PREFIXES):
        return PermanentError
    return UnknownCodeError


def api_error(code: str, message: str, *, request_id: str | None = None) -> ApiError:
    """Build the right ApiError subclass for a code found in `Response.Error`."""
    return classify(code)(code, message, request_id=request_id)

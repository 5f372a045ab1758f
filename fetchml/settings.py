"""FetchML settings: everything comes from the environment, with embedded defaults.

Embedded mode (no DATABASE_URL, no REDIS_URL): SQLite file, in-memory channel
layer, local-memory cache, all in one process. Production: set DATABASE_URL
(PostgreSQL) and REDIS_URL and start each process on its own.
"""

import os
import secrets
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

from fetchml.conf import settings_from_env
from fetchml.env import (
    bound_postgres_waits,
    env_bool,
    env_choice,
    env_float,
    env_int,
    env_list,
    env_str,
    parse_database_url,
)

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(env_str("FETCHML_VAR_DIR", str(BASE_DIR / "var")))

DEBUG = env_bool("DJANGO_DEBUG", False)
DATABASE_URL = env_str("DATABASE_URL")
REDIS_URL = env_str("REDIS_URL")
EMBEDDED = not DATABASE_URL


def _make_var_dir() -> None:
    """Create FETCHML_VAR_DIR 0700 if it is missing: it holds the database, the secret key and the
    admin's key and password. One the operator made is left as they made it (they may share it on
    purpose); the database file in it is kept private all the same (`_private_sqlite_file`)."""
    VAR_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)


def _secret_key() -> str:
    key = env_str("DJANGO_SECRET_KEY")
    if key:
        return key
    if not (DEBUG or EMBEDDED):
        raise ImproperlyConfigured("DJANGO_SECRET_KEY is required when DJANGO_DEBUG is off and DATABASE_URL is set")
    # Embedded/debug: generate once and keep it, so sessions survive restarts.
    key_file = VAR_DIR / "secret_key"
    if not key_file.exists():
        _make_var_dir()
        key_file.write_text(secrets.token_urlsafe(50))
        key_file.chmod(0o600)
    return key_file.read_text().strip()


SECRET_KEY = _secret_key()
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",  # Swagger UI served from /static/, not a CDN
    "channels",
    "fetchml",
    "audit",
    "tasks",
    "scheduler",
    "plugins",
    "jupyter",
    "artifacts",
]

MIDDLEWARE = [
    "fetchml.middleware.TraceIdMiddleware",
    "fetchml.middleware.HeadWithoutBodyMiddleware",  # sees every answer, error bodies included
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "fetchml.middleware.ApiErrorMiddleware",
]

ROOT_URLCONF = "fetchml.urls"
ASGI_APPLICATION = "fetchml.asgi.application"
WSGI_APPLICATION = None

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- database -------------------------------------------------------------
_SQLITE_COMPANIONS = ("-wal", "-shm", "-journal")


def _private_sqlite_file(name: str) -> None:
    """Keep a SQLite database readable by its owner only: it holds session keys, task env secrets
    and plugin settings. Created 0600 before Django opens it (an empty file is a new database to
    SQLite, which gives its -wal, -shm and -journal files the database file's permissions); one an
    earlier start left wider is narrowed, with those files. Only the files: their directory's
    permissions are the operator's, and a PostgreSQL set-up never comes here."""
    if name == ":memory:" or name.startswith("file:"):
        return
    path = Path(name)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass
    except FileNotFoundError:
        return  # no such directory: SQLite says so when it is opened
    for file in (path, *(path.with_name(path.name + suffix) for suffix in _SQLITE_COMPANIONS)):
        try:
            status = file.stat()
        except FileNotFoundError:
            continue
        # Another account's file cannot be changed by this one: its owner set it up.
        if status.st_mode & 0o077 and status.st_uid == os.geteuid():
            file.chmod(0o600)


if DATABASE_URL:
    _db = parse_database_url(DATABASE_URL)
else:
    _db = {"ENGINE": "django.db.backends.sqlite3", "NAME": str(VAR_DIR / "fetchml.sqlite3")}
    _make_var_dir()

if _db["ENGINE"].endswith("sqlite3"):
    _private_sqlite_file(_db["NAME"])
    # WAL lets readers run beside the writer; IMMEDIATE takes the write lock at
    # BEGIN so two writers queue on busy_timeout instead of failing on upgrade.
    _db["OPTIONS"] = {
        "transaction_mode": "IMMEDIATE",
        "timeout": env_float("FETCHML_SQLITE_BUSY_TIMEOUT", 30.0, minimum=0),
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA foreign_keys=ON;",
    }
    # A file (not :memory:) so live-server tests can share the test database
    # with the server and worker processes they start; one file per test run.
    _db["TEST"] = {"NAME": str(VAR_DIR / f"test-{os.getpid()}.sqlite3")}
else:
    _db["CONN_MAX_AGE"] = env_int("FETCHML_DB_CONN_MAX_AGE", 60, minimum=0)
    _db["CONN_HEALTH_CHECKS"] = True
    _db["OPTIONS"].setdefault("connect_timeout", "5")
    bound_postgres_waits(
        _db["OPTIONS"],
        network_seconds=env_int("FETCHML_DB_NETWORK_TIMEOUT_SECONDS", 15, minimum=1),
        stalled_transaction_seconds=env_int("FETCHML_DB_STALLED_TRANSACTION_SECONDS", 15, minimum=0),
    )
    if env_bool("FETCHML_DB_PREPARED_STATEMENTS", True):
        # Values bound by the server and each query prepared after its 5th run on a connection:
        # the hot queries (a dispatch round, a batch of run reports) skip parsing. A pooler in
        # transaction mode must keep prepared statements per client (PgBouncer 1.21+), or set it off.
        _db["OPTIONS"].setdefault("server_side_binding", True)
        _db["OPTIONS"].setdefault("prepare_threshold", 5)
DATABASES = {"default": _db}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- cache and channel layer ---------------------------------------------
# Client WebSockets and SSE streams listen through `live`: one membership per group and process on
# the default layer, fanned out in memory (fetchml/live_layer.py).
LIVE_LAYER_CONFIG = {"BACKEND": "fetchml.live_layer.LiveLayer", "CONFIG": {"inner": "default", "capacity": 1000}}
if REDIS_URL:
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": REDIS_URL,
            # Every request asks it for its rate-limit counter, which takes well under a millisecond:
            # a silent Redis costs a request 2 s (then ratelimits.cache_breaker), not redis-py's 5.
            "OPTIONS": {"socket_timeout": 2, "socket_connect_timeout": 2},
        }
    }
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "fetchml.channel_layer.RedisChannelLayer",  # channels_redis's, fewer round trips
            "CONFIG": {
                # redis-py 8 reads with a 5 s timeout by default, the length of the layer's
                # blocking pop: idle receives then fail and tear consumers down. Longer,
                # still bounded so that a dead connection is noticed.
                "hosts": [{"address": REDIS_URL, "socket_timeout": 15, "socket_connect_timeout": 5}],
                "capacity": 1000,
                "expiry": 30,
            },
        },
        "live": LIVE_LAYER_CONFIG,
    }
    SILENCED_SYSTEM_CHECKS: list[str] = []
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": "fetchml"}}
    # Members in memory die with the process, so they never need to expire; channels' default (a
    # day) would stop telling a worker connected longer of its assignments.
    CHANNEL_LAYERS = {
        "default": {"BACKEND": "channels.layers.InMemoryChannelLayer", "CONFIG": {"group_expiry": 10 * 365 * 86400}},
        "live": LIVE_LAYER_CONFIG,
    }
    # The embedded mode is one process, so a local-memory cache is shared by all
    # of its requests; django-ratelimit cannot know that.
    SILENCED_SYSTEM_CHECKS = ["django_ratelimit.E003", "django_ratelimit.W001"]

# --- auth, i18n, static ---------------------------------------------------
# Messages wait in the session (server-side), not in a cookie: the admin shows a new API key's
# secret once, in a message, and a signed cookie is readable by anything that sees it.
MESSAGE_STORAGE = "django.contrib.messages.storage.session.SessionStorage"
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"
DATA_UPLOAD_MAX_MEMORY_SIZE = env_int("FETCHML_MAX_REQUEST_BYTES", 1024 * 1024, minimum=1024)
DATA_UPLOAD_MAX_NUMBER_FIELDS = 1000

# --- security (production) -----------------------------------------------
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"
SESSION_COOKIE_HTTPONLY = True
if not DEBUG and not EMBEDDED:
    SECURE_SSL_REDIRECT = env_bool("DJANGO_SECURE_SSL_REDIRECT", True)
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = env_int("DJANGO_HSTS_SECONDS", 31536000, minimum=0)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = env_bool("DJANGO_HSTS_PRELOAD", False)
    if env_bool("DJANGO_TRUST_X_FORWARDED_PROTO", False):
        SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    # /health is probed over plain HTTP by load balancers.
    SECURE_REDIRECT_EXEMPT = [r"^health$"]

# --- DRF and the schema ---------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "fetchml.auth.ApiKeyAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["fetchml.permissions.IsHumanUser"],
    "DEFAULT_THROTTLE_CLASSES": ["fetchml.ratelimits.ApiKeyRateThrottle"],
    "DEFAULT_RENDERER_CLASSES": [
        "fetchml.jsonbody.JSONRenderer",
        "rest_framework.renderers.BrowsableAPIRenderer",
    ],
    "DEFAULT_PARSER_CLASSES": ["fetchml.jsonbody.JSONParser"],
    "DEFAULT_CONTENT_NEGOTIATION_CLASS": "fetchml.negotiation.ContentNegotiation",
    "DEFAULT_FILTER_BACKENDS": ["django_filters.rest_framework.DjangoFilterBackend"],
    "DEFAULT_PAGINATION_CLASS": None,
    "DEFAULT_SCHEMA_CLASS": "fetchml.schema.AutoSchema",
    "EXCEPTION_HANDLER": "fetchml.errors.exception_handler",
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "FetchML API",
    "DESCRIPTION": "Queue and schedule ML experiment jobs on GPU workers.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SCHEMA_PATH_PREFIX": r"/v1",
    "COMPONENT_SPLIT_REQUEST": True,
    # A PATCH body is validated whole (the priority PATCH requires `priority`), not as a partial update.
    "COMPONENT_SPLIT_PATCH": False,
    # The ApiKeyAuth scheme and each operation's requirement come from the
    # extension in fetchml/schema.py (a global SECURITY would list it twice). A logged-in admin
    # session (cookieAuth) also works, for browsing the API; its unsafe methods need the CSRF token.
    "AUTHENTICATION_WHITELIST": [
        "fetchml.auth.ApiKeyAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "ENUM_NAME_OVERRIDES": {
        "ExperimentStatusEnum": "tasks.models.Experiment.Status",
        "TaskStatusEnum": "tasks.states.TaskStatus",
    },
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        # /health, the log and SSE streams and /ws: served outside DRF.
        "fetchml.schema.add_plain_view_operations",
    ],
    # /v1/docs loads Swagger UI from drf-spectacular-sidecar, so it works offline.
    "SWAGGER_UI_DIST": "SIDECAR",
    # An id in a path (fetchml.converters) is a UUID, in either case.
    "PATH_CONVERTER_OVERRIDES": {"id": {"type": "string", "format": "uuid"}},
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    # No validator badge: it would send the schema's URL to validator.swagger.io.
    "SWAGGER_UI_SETTINGS": {"deepLinking": True, "validatorUrl": None},
}

# --- FetchML product settings (defaults live in fetchml/conf.py) ----------
_product_settings = settings_from_env()
globals().update(_product_settings)
FETCHML_STORAGE_DIR = _product_settings["FETCHML_STORAGE_DIR"] or str(VAR_DIR / "storage")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {
        "trace_id": {"()": "fetchml.tracing.TraceIdFilter"},
        "client_mistakes": {"()": "fetchml.logformat.ClientMistakeFilter"},
    },
    "formatters": {
        "plain": {
            "class": "fetchml.logformat.OneLineFormatter",
            "format": "%(asctime)s %(levelname)s %(name)s trace_id=%(trace_id)s %(message)s",
        },
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": "plain",
            "filters": ["trace_id", "client_mistakes"],
        },
    },
    "root": {"handlers": ["console"], "level": env_choice("FETCHML_LOG_LEVEL", "INFO", LOG_LEVELS)},
    "loggers": {
        "django.request": {"level": "ERROR"},
        "daphne": {"level": "WARNING"},
    },
}

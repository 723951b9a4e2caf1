import os

# Settings refuse to start without a SECRET_KEY outside DEBUG; tests get a
# throwaway one so that `pytest` works on a fresh checkout without a .env.
os.environ.setdefault("SECRET_KEY", "test-only-secret-key")

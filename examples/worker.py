"""A worker for the demo tasks, in the original README's style: app.start()."""

from demo_tasks import app

if __name__ == "__main__":
    app.start()

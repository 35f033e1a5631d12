"""The example flow `pushpool quickstart` deploys and runs on a process:push pool."""

from prefect import flow, get_run_logger, task


@task
def greeting(name: str) -> str:
    return f"Hello, {name}! This flow run was pushed by pushpool: no worker was running."


@flow(name="pushpool-quickstart", log_prints=True)
def hello(name: str = "pushpool") -> str:
    message = greeting(name)
    get_run_logger().info(message)
    return message


if __name__ == "__main__":
    hello()

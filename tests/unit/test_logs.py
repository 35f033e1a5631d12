import io
import json
import logging

from dispatcher.logs import Redactor, configure_logging, get_logger, log_context


def test_json_lines_carry_the_flow_run_id_and_never_a_secret():
    stream = io.StringIO()
    redactor = Redactor(["admin:s3cret"])
    configure_logging(redactor, level="DEBUG", stream=stream)
    logger = get_logger("test")
    redactor.add(["AKIA-block-secret"])
    with log_context(flow_run_id="run-1"):
        logger.info("token %s and admin:s3cret", "AKIA-block-secret", extra={"detail": "AKIA-block-secret"})
        try:
            raise RuntimeError("failed with admin:s3cret")
        except RuntimeError:
            logger.exception("boom")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert lines[0]["flow_run_id"] == "run-1"
    assert lines[0]["message"] == "token ******** and ********"
    assert lines[0]["detail"] == "********"
    assert "s3cret" not in stream.getvalue() and "AKIA-block-secret" not in stream.getvalue()
    assert "RuntimeError" in lines[1]["exception"]
    logging.getLogger("pushpool").handlers.clear()


def test_short_values_are_not_treated_as_secrets():
    assert Redactor(["ab"]).redact("ab cd") == "ab cd"

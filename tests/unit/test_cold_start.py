"""The dispatcher must not import `prefect` (it costs over a second at every
cold start); only the flows it runs do."""

import subprocess
import sys


def test_the_dispatcher_does_not_import_prefect_or_heavy_optional_modules():
    code = (
        "import sys\n"
        "import dispatcher.dispatch, dispatcher.serve, dispatcher.cli, providers.process\n"
        "import dispatcher.aws_lambda, dispatcher.http\n"
        "heavy = ('prefect', 'websockets', 'jsonschema', 'boto3', 'botocore.session', 'aws_xray_sdk')\n"
        "heavy = sorted(m for m in heavy if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""

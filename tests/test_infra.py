"""The infrastructure templates in infra/: the CloudFormation stack is linted, deployed
into the AWS Batch emulator (moto's CloudFormation over real HTTP) and an executor runs
jobs on the queue, definition and bucket it outputs; the ARM template's structure is
checked (types, references, one task slot per vCPU, container configuration, least
privilege)."""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
CFN_TEMPLATE = ROOT / "infra" / "aws" / "cloudexec.yaml"
ARM_TEMPLATE = ROOT / "infra" / "azure" / "cloudexec.json"


# ---------------------------------------------------------------- CloudFormation


def _load_cfn() -> dict[str, Any]:
    """Parses the YAML template, turning short-form tags (!Ref, !Sub...) into their long form."""
    yaml = pytest.importorskip("yaml")

    class Loader(yaml.SafeLoader):
        pass

    def construct(loader: Any, suffix: str, node: Any) -> dict[str, Any]:
        if isinstance(node, yaml.ScalarNode):
            value: Any = loader.construct_scalar(node)
        elif isinstance(node, yaml.SequenceNode):
            value = loader.construct_sequence(node, deep=True)
        else:
            value = loader.construct_mapping(node, deep=True)
        if suffix == "Ref":
            return {"Ref": value}
        if suffix == "GetAtt" and isinstance(value, str):
            value = value.split(".", 1)
        return {f"Fn::{suffix}": value}

    Loader.add_multi_constructor("!", construct)
    return dict(yaml.load(CFN_TEMPLATE.read_text(), Loader=Loader))


def _resources_of_type(template: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {name: res for name, res in template["Resources"].items() if res["Type"] == kind}


def test_cloudformation_template_passes_cfn_lint() -> None:
    api = pytest.importorskip("cfnlint.api", reason="cfn-lint comes with moto[server]: pip install 'moto[server]'")
    matches = api.lint_file(CFN_TEMPLATE)
    assert not matches, "\n".join(str(m) for m in matches)


def test_cloudformation_template_has_every_piece() -> None:
    template = _load_cfn()
    kinds = {res["Type"] for res in template["Resources"].values()}
    assert {
        "AWS::S3::Bucket",
        "AWS::IAM::Role",
        "AWS::IAM::InstanceProfile",
        "AWS::Batch::ComputeEnvironment",
        "AWS::Batch::JobQueue",
        "AWS::Batch::JobDefinition",
    } <= kinds
    # Every Ref / GetAtt names a parameter, a resource or a pseudo parameter.
    known = set(template["Parameters"]) | set(template["Resources"])
    text = json.dumps(template)
    for ref in re.findall(r'"Ref": "([^"]+)"', text):
        assert ref in known or ref.startswith("AWS::"), ref
    for name in re.findall(r'"Fn::GetAtt": \["([^"]+)"', text):
        assert name in template["Resources"], name
    for name in re.findall(r"\$\{([A-Za-z0-9:]+)(?:\.[A-Za-z]+)?\}", text):
        assert name in known or name.startswith("AWS::"), name
    assert {"JobQueueArn", "JobDefinitionArn", "IoUrl"} <= set(template["Outputs"])


def test_cloudformation_bucket_expires_payloads_under_the_prefix() -> None:
    template = _load_cfn()
    (bucket,) = _resources_of_type(template, "AWS::S3::Bucket").values()
    (rule,) = bucket["Properties"]["LifecycleConfiguration"]["Rules"]
    assert rule["Status"] == "Enabled"
    assert rule["Prefix"] == {"Fn::Sub": "${IoPrefix}/"}
    assert rule["ExpirationInDays"] == {"Ref": "ExpireAfterDays"}
    public = bucket["Properties"]["PublicAccessBlockConfiguration"]
    assert all(public.values()), public


def test_cloudformation_job_role_reaches_only_the_io_prefix() -> None:
    template = _load_cfn()
    definition = next(iter(_resources_of_type(template, "AWS::Batch::JobDefinition").values()))
    container = definition["Properties"]["ContainerProperties"]
    job_role = container["JobRoleArn"]["Fn::GetAtt"][0]
    assert container["ExecutionRoleArn"]["Fn::GetAtt"][0] != job_role  # pulling images is not the job's right
    assert container["Image"] == {"Ref": "ImageUri"}
    assert container["Command"][:3] == ["python", "-m", "cloudexec.runner"]
    role = template["Resources"][job_role]["Properties"]
    assert "ManagedPolicyArns" not in role  # no broad AWS-managed policy on the job
    statements = [s for p in role["Policies"] for s in p["PolicyDocument"]["Statement"]]
    for statement in statements:
        assert statement["Effect"] == "Allow"
        actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        assert all(a.startswith("s3:") and "*" not in a for a in actions), actions
        resource = json.dumps(statement["Resource"])
        assert "IoBucket" in resource, resource
    object_statement = next(s for s in statements if "s3:GetObject" in s["Action"])
    assert object_statement["Resource"] == {"Fn::Sub": "arn:${AWS::Partition}:s3:::${IoBucket}/${IoPrefix}/*"}
    listing = next(s for s in statements if s["Action"] == "s3:ListBucket")
    assert listing["Condition"] == {"StringLike": {"s3:prefix": [{"Fn::Sub": "${IoPrefix}/*"}]}}


@pytest.fixture(scope="module")
def stack() -> Iterator[tuple[Any, dict[str, str]]]:
    pytest.importorskip("moto")
    from cloudexec.testing import aws_batch_emulator

    with aws_batch_emulator(timeout_scale=0.02, max_vcpus=2) as emu:
        ec2 = emu.client("ec2")
        subnet = ec2.describe_subnets()["Subnets"][0]["SubnetId"]
        group = ec2.describe_security_groups()["SecurityGroups"][0]["GroupId"]
        cfn = emu.client("cloudformation")
        cfn.create_stack(
            StackName="cloudexec",
            TemplateBody=CFN_TEMPLATE.read_text(),
            Capabilities=["CAPABILITY_IAM"],
            Parameters=[
                {"ParameterKey": "ImageUri", "ParameterValue": "cloudexec:test"},
                {"ParameterKey": "Subnets", "ParameterValue": subnet},
                {"ParameterKey": "SecurityGroupIds", "ParameterValue": group},
                {"ParameterKey": "MaxvCpus", "ParameterValue": "2"},
            ],
        )
        described = cfn.describe_stacks(StackName="cloudexec")["Stacks"][0]
        assert described["StackStatus"] == "CREATE_COMPLETE", described.get("StackStatusReason")
        outputs = {o["OutputKey"]: o["OutputValue"] for o in described["Outputs"]}
        yield emu, outputs


@pytest.mark.aws
def test_cloudformation_stack_deploys_and_runs_jobs(stack: tuple[Any, dict[str, str]]) -> None:
    emu, outputs = stack
    # Nothing of the emulator's own set-up is used: queue, definition and bucket
    # all come from the stack.
    assert outputs["JobQueueArn"] != emu.job_queue
    assert outputs["JobDefinitionArn"] != emu.job_definition
    assert not outputs["IoUrl"].startswith(f"s3://{emu.bucket}/")
    with emu.executor(
        job_queue=outputs["JobQueueArn"],
        job_definition=outputs["JobDefinitionArn"],
        io_bucket=outputs["IoUrl"],
        poll_interval_s=(0.05, 0.5),
    ) as ex:
        future = ex.submit(pow, 2, 10)
        assert future.result(timeout=60) == 1024
        assert list(ex.map(abs, [-1, -2, -3], timeout=60)) == [1, 2, 3]
    batch = emu.client("batch")
    queued = batch.list_jobs(jobQueue=outputs["JobQueueArn"], filters=[{"name": "JOB_NAME", "values": ["pow*"]}])
    assert queued["jobSummaryList"], "the job did not run on the stack's queue"
    (job,) = batch.describe_jobs(jobs=[queued["jobSummaryList"][0]["jobId"]])["jobs"]
    assert job["jobDefinition"] == outputs["JobDefinitionArn"]
    assert job["status"] == "SUCCEEDED"
    bucket = outputs["BucketName"]
    keys = emu.client("s3").list_objects_v2(Bucket=bucket).get("Contents", [])
    assert keys and all(k["Key"].startswith("cloudexec/") for k in keys)


@pytest.mark.aws
def test_cloudformation_stack_roles_as_deployed(stack: tuple[Any, dict[str, str]]) -> None:
    emu, outputs = stack
    iam = emu.client("iam")
    role_name = outputs["JobRoleArn"].rsplit("/", 1)[1]
    assert iam.list_attached_role_policies(RoleName=role_name)["AttachedPolicies"] == []
    (policy_name,) = iam.list_role_policies(RoleName=role_name)["PolicyNames"]
    document = iam.get_role_policy(RoleName=role_name, PolicyName=policy_name)["PolicyDocument"]
    if isinstance(document, str):
        try:
            document = json.loads(document)
        except ValueError:
            # moto stores a document that came from CloudFormation as a Python repr.
            document = ast.literal_eval(document)
    resources = {json.dumps(s["Resource"]) for s in document["Statement"]}
    assert resources == {
        json.dumps(f"arn:aws:s3:::{outputs['BucketName']}/cloudexec/*"),
        json.dumps(f"arn:aws:s3:::{outputs['BucketName']}"),
    }
    definition = emu.client("batch").describe_job_definitions(jobDefinitions=[outputs["JobDefinitionArn"]])
    container = definition["jobDefinitions"][0]["containerProperties"]
    assert container["jobRoleArn"] == outputs["JobRoleArn"]
    assert container["image"] == "cloudexec:test"


# ---------------------------------------------------------------- ARM (Azure)


def _load_arm() -> dict[str, Any]:
    return dict(json.loads(ARM_TEMPLATE.read_text()))


def _one(template: dict[str, Any], kind: str) -> dict[str, Any]:
    (resource,) = [r for r in template["resources"] if r["type"] == kind]
    return dict(resource)


def test_arm_template_structure() -> None:
    template = _load_arm()
    assert template["$schema"].endswith("/deploymentTemplate.json#")
    assert re.fullmatch(r"\d+\.\d+\.\d+\.\d+", template["contentVersion"])
    kinds = [r["type"] for r in template["resources"]]
    assert len(kinds) == len(set(kinds))
    assert {
        "Microsoft.Storage/storageAccounts",
        "Microsoft.Storage/storageAccounts/blobServices/containers",
        "Microsoft.Storage/storageAccounts/managementPolicies",
        "Microsoft.ManagedIdentity/userAssignedIdentities",
        "Microsoft.Authorization/roleAssignments",
        "Microsoft.Batch/batchAccounts",
        "Microsoft.Batch/batchAccounts/pools",
    } == set(kinds)
    for resource in template["resources"]:
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}(-preview)?", resource["apiVersion"]), resource
        assert resource["name"]
        # A child's name has one segment per type segment after the namespace.
        if resource["type"] != "Microsoft.Authorization/roleAssignments":
            segments = resource["type"].count("/")
            name = resource["name"]
            if not name.startswith("["):
                assert name.count("/") == segments - 1, resource
    # Every expression names declared parameters and variables, and every dependency
    # is a resource of this template.
    text = json.dumps(template)
    for name in re.findall(r"parameters\('([^']+)'\)", text):
        assert name in template["parameters"], name
    for name in re.findall(r"variables\('([^']+)'\)", text):
        assert name in template["variables"], name
    for resource in template["resources"]:
        for dependency in resource.get("dependsOn", []):
            kind = re.match(r"\[resourceId\('([^']+)'", dependency)
            assert kind is not None and kind.group(1) in kinds, dependency
    for value in (template["parameters"], template["variables"], template["outputs"]):
        for expr in re.findall(r'"(\[[^"]*)"', json.dumps(value)):
            assert expr.endswith("]") and expr.count("(") == expr.count(")"), expr


def test_arm_pool_has_one_task_slot_per_vcpu() -> None:
    template = _load_arm()
    pool = _one(template, "Microsoft.Batch/batchAccounts/pools")["properties"]
    variables = template["variables"]
    assert pool["taskSlotsPerNode"] == "[variables('taskSlotsPerNode')]"
    assert variables["taskSlotsPerNode"] == "[variables('vcpusByVmSize')[parameters('vmSize')]]"
    assert pool["vmSize"] == "[parameters('vmSize')]"
    sizes = template["parameters"]["vmSize"]
    # Only sizes whose vCPU count is known can be chosen, so the lookup cannot fail.
    assert set(sizes["allowedValues"]) == set(variables["vcpusByVmSize"])
    assert sizes["defaultValue"] in sizes["allowedValues"]
    for size, vcpus in variables["vcpusByVmSize"].items():
        # Azure's size names carry the vCPU count: Standard_D4s_v3 has 4.
        match = re.fullmatch(r"Standard_[A-Z]+(\d+)[a-z_A-Z0-9]*", size)
        assert match is not None and int(match.group(1)) == vcpus, size
    # The autoscale formula packs pending tasks onto nodes by the same slot count.
    assert "variables('taskSlotsPerNode')" in variables["autoScaleFormula"]
    assert pool["scaleSettings"]["autoScale"]["formula"] == "[variables('autoScaleFormula')]"
    assert pool["taskSchedulingPolicy"]["nodeFillType"] == "Pack"


def test_arm_pool_runs_the_runner_image_in_containers() -> None:
    template = _load_arm()
    pool = _one(template, "Microsoft.Batch/batchAccounts/pools")
    vm = pool["properties"]["deploymentConfiguration"]["virtualMachineConfiguration"]
    containers = vm["containerConfiguration"]
    assert containers["type"] == "DockerCompatible"
    assert containers["containerImageNames"] == ["[parameters('containerImage')]"]
    assert "containerImage" in template["parameters"]
    assert "defaultValue" not in template["parameters"]["containerImage"]  # must be chosen
    assert set(vm["imageReference"]) == {"publisher", "offer", "sku", "version"}
    assert vm["nodeAgentSkuId"].startswith("batch.node.")
    # Jobs reach storage with the pool's identity, not with a key in the task.
    (identity,) = pool["identity"]["userAssignedIdentities"]
    assert "Microsoft.ManagedIdentity/userAssignedIdentities" in identity


def test_arm_jobs_identity_reaches_only_the_container() -> None:
    template = _load_arm()
    assignment = _one(template, "Microsoft.Authorization/roleAssignments")
    assert "/blobServices/default/containers/" in assignment["scope"]
    assert assignment["scope"].endswith("parameters('containerName'))]")
    # Storage Blob Data Contributor: read/write/delete blobs, no account keys, no RBAC.
    assert template["variables"]["storageBlobDataContributor"] == "ba92f5b4-2d11-453d-a403-e96b0029c9fe"
    account = _one(template, "Microsoft.Storage/storageAccounts")["properties"]
    assert account["allowBlobPublicAccess"] is False
    rule = _one(template, "Microsoft.Storage/storageAccounts/managementPolicies")["properties"]["policy"]["rules"][0]
    assert rule["enabled"] is True
    assert rule["definition"]["filters"]["prefixMatch"] == [
        "[concat(parameters('containerName'), '/', parameters('ioPrefix'), '/')]"
    ]
    assert "delete" in rule["definition"]["actions"]["baseBlob"]


def test_arm_outputs_are_what_the_executor_takes() -> None:
    template = _load_arm()
    outputs = template["outputs"]
    assert {"batchUrl", "poolId", "storageUrl", "storageAccountName", "jobsIdentityClientId"} <= set(outputs)
    # With the defaults filled in, the outputs are accepted by AzureBatchExecutor's checks.
    params = {k: v.get("defaultValue") for k, v in template["parameters"].items()}
    storage_url = f"az://{params['containerName']}/{params['ioPrefix']}"
    assert outputs["storageUrl"]["value"] == "[concat('az://', parameters('containerName'), '/', parameters('ioPrefix'))]"
    assert re.fullmatch(r"^(az|abfs)://([^/]+)(/.*)?$", storage_url)
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,64}", params["poolId"])
    assert re.fullmatch(r"[a-z0-9]{3,11}", params["namePrefix"])

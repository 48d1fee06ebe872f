// Validates custom resources (KEDA ScaledObject/TriggerAuthentication,
// Prometheus Operator ServiceMonitor) against schemas generated from the
// projects' own CRDs, as packaged by kubernetes-models on npm.
//
// Input: a JSON array of Kubernetes objects on stdin (.ci/deploy-checks
// converts the YAML). Exit 1 if any object is invalid or of a kind without a
// schema here. What this checks: types, required fields, enums and formats.
// What it cannot: unknown fields (the generated validators allow them).
import { readFileSync } from "node:fs";
import { ScaledObject, TriggerAuthentication } from "@kubernetes-models/keda/keda.sh/v1alpha1";
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";

const models = {
  "keda.sh/v1alpha1/ScaledObject": ScaledObject,
  "keda.sh/v1alpha1/TriggerAuthentication": TriggerAuthentication,
  "monitoring.coreos.com/v1/ServiceMonitor": ServiceMonitor,
};

let failed = 0;
for (const obj of JSON.parse(readFileSync(0, "utf8"))) {
  const key = `${obj.apiVersion}/${obj.kind}`;
  const name = `${obj.kind}/${obj.metadata?.name}`;
  const Model = models[key];
  if (!Model) {
    console.error(`ERROR ${name}: no schema for ${key}`);
    failed++;
    continue;
  }
  try {
    new Model(obj).validate();
    console.log(`ok    ${name} (${key})`);
  } catch (e) {
    console.error(`ERROR ${name}: ${e.message}`);
    failed++;
  }
}
process.exit(failed ? 1 : 0);

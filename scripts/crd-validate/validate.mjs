// Validates the custom resources in rendered manifests against the schemas of their CRDs
// (kubernetes-models), which kubernetes-validate does not carry. Usage: node validate.mjs FILE...
import fs from "node:fs";
import { loadAll } from "js-yaml";
import { PodMonitor, ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";
import { ScaledObject } from "@kubernetes-models/keda/keda.sh/v1alpha1";

const models = {
  "monitoring.coreos.com/v1 ServiceMonitor": ServiceMonitor,
  "monitoring.coreos.com/v1 PodMonitor": PodMonitor,
  "keda.sh/v1alpha1 ScaledObject": ScaledObject,
};
let checked = 0;
let invalid = 0;
for (const file of process.argv.slice(2)) {
  for (const doc of loadAll(fs.readFileSync(file, "utf8"))) {
    const Model = doc && models[`${doc.apiVersion} ${doc.kind}`];
    if (!Model) continue;
    checked++;
    try {
      new Model(doc).validate();
    } catch (e) {
      invalid++;
      console.log(`ERROR ${file}: ${doc.kind}/${doc.metadata?.name}: ${e.message}`);
    }
  }
}
console.log(`   custom resources: ${checked} checked, ${invalid} invalid`);
process.exit(invalid ? 1 : 0);

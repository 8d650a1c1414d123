// Validates KEDA objects (JSON array on stdin) against the schemas of KEDA's CRDs, as compiled
// into @kubernetes-models/keda. Prints a JSON array: one list of error messages per object.
import { readFileSync } from "node:fs";
import { ScaledObject } from "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject";

const models = { ScaledObject };
const docs = JSON.parse(readFileSync(0, "utf8"));
const results = docs.map((doc) => {
  const Model = models[doc.kind];
  if (!Model) return [`unsupported kind ${doc.kind}`];
  if (doc.apiVersion !== Model.apiVersion) return [`apiVersion must be ${Model.apiVersion}`];
  try {
    new Model(doc).validate();
    return [];
  } catch (error) {
    return [String(error.message ?? error)];
  }
});
process.stdout.write(JSON.stringify(results));

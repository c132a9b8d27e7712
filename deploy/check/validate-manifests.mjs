// Validates Kubernetes manifests (helm template output, deploy/kubernetes) the way an API server
// would, without one:
//   - YAML parsed as 1.1 (what kubectl and Helm read: 0440 is octal, yes/no are booleans), with
//     duplicate keys an error;
//   - every object checked against Kubernetes' OpenAPI models by kubernetes-models (types,
//     required fields, formats), and ServiceMonitor by @kubernetes-models/prometheus-operator;
//   - unknown fields rejected: every key must be in the model's attribute map of
//     @kubernetes/client-node (for the CRD, in its model's type declaration).
// Also: every object names apiVersion, kind and metadata.name, no two share kind/namespace/name,
// and names are DNS-1123.
//
// usage: node validate-manifests.mjs --modules=DIR [--extract=DIR] [--label=TEXT] FILE... (- = stdin)
//   --modules  the directory holding node_modules (npm ci of deploy/check/package-lock.json)
//   --extract  also write each ConfigMap's data to DIR/<configmap name>/<key>
// Prints one line per object and exits 1 on the first file with errors, after listing them all.
import { createRequire } from "node:module";
import fs from "node:fs";
import path from "node:path";
import { pathToFileURL } from "node:url";

const args = process.argv.slice(2);
const opt = (name) => {
  const a = args.find((x) => x.startsWith(`--${name}=`));
  return a ? a.slice(name.length + 3) : undefined;
};
const files = args.filter((x) => !x.startsWith("--"));
const modules = opt("modules");
const extract = opt("extract");
const label = opt("label") ?? "";
if (!modules || files.length === 0) {
  console.error("usage: validate-manifests.mjs --modules=DIR [--extract=DIR] [--label=TEXT] FILE...");
  process.exit(2);
}
const require = createRequire(path.join(path.resolve(modules), "package.json"));
const YAML = require("yaml");
const k8s = await import(
  pathToFileURL(require.resolve("@kubernetes/client-node/dist/gen/models/all.js")).href
);

// --- unknown fields, by @kubernetes/client-node's attribute maps --------------------------------
const primitive = new Set(["string", "number", "boolean", "Date", "any", "object", "IntOrString"]);
function checkFields(value, type, where, errors) {
  if (value === null || value === undefined) return;
  let m;
  if ((m = /^Array<(.+)>$/.exec(type))) {
    if (!Array.isArray(value)) return errors.push(`${where}: expected a list (${type})`);
    value.forEach((v, i) => checkFields(v, m[1], `${where}[${i}]`, errors));
    return;
  }
  if ((m = /^\{ \[key: string\]: (.+); \}$/.exec(type))) {
    if (typeof value !== "object" || Array.isArray(value)) {
      return errors.push(`${where}: expected a map (${type})`);
    }
    for (const [k, v] of Object.entries(value)) checkFields(v, m[1], `${where}.${k}`, errors);
    return;
  }
  if (primitive.has(type)) return;
  const model = k8s[type];
  if (!model || typeof model.getAttributeTypeMap !== "function") {
    return errors.push(`${where}: no model for type ${type}`);
  }
  if (typeof value !== "object" || Array.isArray(value)) {
    return errors.push(`${where}: expected an object (${type})`);
  }
  const fields = new Map(model.getAttributeTypeMap().map((a) => [a.baseName, a.type]));
  for (const [k, v] of Object.entries(value)) {
    if (!fields.has(k)) errors.push(`${where}.${k}: unknown field (${type} has no '${k}')`);
    else checkFields(v, fields.get(k), `${where}.${k}`, errors);
  }
}

// --- unknown fields of a CRD, from its kubernetes-models type declaration (.d.ts) ---------------
// The declarations are regular: one `"key"?: type;` per line, nested objects open with `{` or
// `Array<{` and close with `};` or `}>;`. Builds {fields: Map<key, node|null>} (null: a leaf or a
// free-form map).
function parseDeclaration(file, iface) {
  const lines = fs.readFileSync(file, "utf8").split("\n");
  const start = lines.findIndex((l) => l.startsWith(`export interface ${iface} {`));
  if (start < 0) throw new Error(`${file}: no interface ${iface}`);
  const root = { fields: new Map() };
  const stack = [root];
  for (const line of lines.slice(start + 1)) {
    const t = line.trim();
    if (t === "}" && stack.length === 1) break;
    const field = /^"([^"]+)"\??: (.*)$/.exec(t);
    if (/^\[key: string\]: /.test(t)) {
      stack.at(-1).free = true;  // an index signature: a map with any keys
    } else if (field) {
      const [, key, rest] = field;
      if (rest === "{" || rest === "Array<{") {
        const node = { fields: new Map() };
        stack.at(-1).fields.set(key, node);
        stack.push(node);
      } else {
        stack.at(-1).fields.set(key, null);
      }
    } else if (t === "};" || t === "}>;" || t === "}>" || t === "}") {
      stack.pop();
      if (stack.length === 0) break;
    }
  }
  return root;
}
function checkDeclared(value, node, where, errors) {
  if (node === null || node.free || value === null || typeof value !== "object") return;
  if (Array.isArray(value)) {
    value.forEach((v, i) => checkDeclared(v, node, `${where}[${i}]`, errors));
    return;
  }
  for (const [k, v] of Object.entries(value)) {
    if (!node.fields.has(k)) errors.push(`${where}.${k}: unknown field`);
    else checkDeclared(v, node.fields.get(k), `${where}.${k}`, errors);
  }
}

// --- the models --------------------------------------------------------------------------------
const crds = {
  "monitoring.coreos.com/v1/ServiceMonitor": {
    pkg: "@kubernetes-models/prometheus-operator",
    iface: "IServiceMonitor",
  },
};
function modelFor(apiVersion, kind) {
  const [group, version] = apiVersion.includes("/") ? apiVersion.split("/") : ["", apiVersion];
  const crd = crds[`${apiVersion}/${kind}`];
  if (crd) {
    const base = `${crd.pkg}/${group}/${version}/${kind}`;
    return {
      cls: require(base)[kind],
      check(obj, errors) {
        const decl = parseDeclaration(require.resolve(base).replace(/\.js$/, ".d.ts"), crd.iface);
        const { metadata, ...rest } = obj;
        checkDeclared(rest, decl, kind, errors);
        checkFields(metadata, "V1ObjectMeta", `${kind}.metadata`, errors);
      },
    };
  }
  const modulePath = group ? `kubernetes-models/${group}/${version}/${kind}` : `kubernetes-models/${version}/${kind}`;
  let cls;
  try {
    cls = require(modulePath)[kind];
  } catch {
    return null;
  }
  const typeName = version.charAt(0).toUpperCase() + version.slice(1) + kind;
  return { cls, check: (obj, errors) => checkFields(obj, typeName, kind, errors) };
}

const dns1123 = /^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$/;
let failed = false;
for (const file of files) {
  const text = fs.readFileSync(file === "-" ? 0 : file, "utf8");
  const docs = YAML.parseAllDocuments(text, { version: "1.1", uniqueKeys: true, strict: true });
  const errors = [];
  const seen = new Set();
  let count = 0;
  for (const doc of Array.isArray(docs) ? docs : [docs]) {
    for (const e of [...doc.errors, ...doc.warnings]) errors.push(`YAML: ${e.message.split("\n")[0]}`);
    if (doc.errors.length) continue;
    const obj = doc.toJS({ maxAliasCount: 100 });
    if (obj === null || obj === undefined) continue;  // an empty document (helm leaves some)
    count++;
    const id = `${obj.kind ?? "?"}/${obj.metadata?.name ?? "?"}`;
    const objErrors = [];
    if (typeof obj.apiVersion !== "string" || typeof obj.kind !== "string") {
      objErrors.push("apiVersion and kind are required");
    } else if (typeof obj.metadata?.name !== "string" || !dns1123.test(obj.metadata.name)
               || obj.metadata.name.length > 253) {
      objErrors.push(`metadata.name '${obj.metadata?.name}' is not a DNS-1123 name`);
    } else {
      const key = `${obj.kind}/${obj.metadata.namespace ?? ""}/${obj.metadata.name}`;
      if (seen.has(key)) objErrors.push(`${key} appears twice`);
      seen.add(key);
      const model = modelFor(obj.apiVersion, obj.kind);
      if (!model) {
        objErrors.push(`no model for ${obj.apiVersion} ${obj.kind}`);
      } else {
        try {
          new model.cls(obj).validate();
        } catch (e) {
          const details = e.errors?.map((d) => `${d.instancePath || "/"} ${d.message}`) ?? [];
          objErrors.push(...(details.length ? details : [e.message]));
        }
        model.check(obj, objErrors);
      }
    }
    for (const e of objErrors) errors.push(`${id}: ${e}`);
    console.log(`  ${objErrors.length ? "FAIL" : "ok  "} ${obj.apiVersion} ${id}`);
    if (extract && obj.kind === "ConfigMap" && obj.data && !objErrors.length) {
      for (const [k, v] of Object.entries(obj.data)) {
        const dir = path.join(extract, obj.metadata.name);
        fs.mkdirSync(dir, { recursive: true });
        fs.writeFileSync(path.join(dir, k), v);
      }
    }
  }
  if (count === 0) errors.push("no objects");
  if (errors.length) {
    failed = true;
    console.error(`${label}${file}: ${errors.length} error(s):`);
    for (const e of errors) console.error(`  ${e}`);
  } else {
    console.log(`${label}${file}: ${count} objects valid`);
  }
}
process.exit(failed ? 1 : 0);

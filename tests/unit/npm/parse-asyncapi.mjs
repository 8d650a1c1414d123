// Parses an AsyncAPI document with the official parser (@asyncapi/parser: schema validation,
// $ref resolution including external files, and its built-in rules). Prints a JSON object:
// {"valid": bool, "diagnostics": [{"severity", "code", "path", "message"}]}.
import { Parser, fromFile } from "@asyncapi/parser";

const { document, diagnostics } = await fromFile(new Parser(), process.argv[2]).parse();
const out = diagnostics.map((d) => ({
  severity: d.severity,
  code: String(d.code),
  path: d.path.join("."),
  message: d.message,
}));
process.stdout.write(JSON.stringify({ valid: document !== undefined, diagnostics: out }));

// Preloaded (node --require) into each of node-postgres's test files by run.py --driver node-postgres:
// writes each test's outcome as one JSON line to $NODEPG_REPORT.
//
// node-postgres's runner (packages/pg/test/suite.js) prints "  name ✔" but a test's own console
// output can land between the name and the mark, and on the first failure it calls
// process.exit(-1), so its stdout cannot be split reliably. This wraps Suite#run instead: the
// outcome is taken from the test's own callback, and a test still running when the process
// exits (its 5 s timer, an uncaught exception) is recorded as failed with the exit code.
//
// $NODEPG_SKIP_TESTS (JSON {"file::test name": reason}) names tests skipped, on both sides, for
// a stated reason: the test is not run (as suite.js skips a test without a body), so the rest
// of its file still runs. $NODEPG_TEST_TIMEOUT (ms) replaces suite.js's 5 s per test, to tell
// a slow test from a stuck one.
'use strict'
const fs = require('fs')
const path = require('path')

const report = process.env.NODEPG_REPORT
const file = process.env.NODEPG_TEST_FILE
const Suite = require(path.join(process.env.NODEPG_PG_DIR, 'test', 'suite.js'))

const skips = JSON.parse(process.env.NODEPG_SKIP_TESTS || '{}')
const timeout = parseInt(process.env.NODEPG_TEST_TIMEOUT || '0', 10)

let current = null
let recorded = 0
const record = (name, outcome, message) => {
  recorded += 1
  fs.appendFileSync(report, JSON.stringify({ file, name, outcome, message: message || '' }) + '\n')
}

const run = Suite.prototype.run
Suite.prototype.run = function (test, cb) {
  const skip = skips[`${file}::${test.name}`]
  if (skip) test.action = null
  if (timeout) test.timeout = timeout
  if (!test.action) {
    record(test.name, 'skipped', skip || 'no test body')
    return run.call(this, test, cb)
  }
  current = test.name
  const testRun = test.run.bind(test)
  test.run = (done) =>
    testRun((err) => {
      current = null
      record(test.name, err ? 'failed' : 'passed', err ? String(err.message || err) : '')
      done(err)
    })
  return run.call(this, test, cb)
}

process.on('exit', (code) => {
  if (current !== null) {
    record(current, 'failed', `process exited (${code}) while the test ran: timeout or uncaught error`)
  } else if (code !== 0 || recorded === 0) {
    // A file that uses no Suite (plain asserts), or one that failed outside any test.
    record('(file)', code === 0 ? 'passed' : 'failed', code === 0 ? '' : `process exited (${code})`)
  }
})

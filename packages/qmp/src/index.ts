/** @lifeboat/qmp: public API. */
export {};

/** @lifeboat/process-server: public API. */
export {};
